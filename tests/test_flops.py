"""FLOPs of sparse models against hand-computed multiply-adds of tiny MLPs, convs and attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.flops import TRAINING_FACTOR, dense_costs, flops_summary, forward_flops


def test_mlp_by_hand() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    costs = dense_costs(model, (2, 3))
    assert costs.layers == {"1.weight": 6 * 4, "3.weight": 4 * 3}
    assert costs.total == 36 and costs.other == 0
    densities = {"1.weight": 0.5, "3.weight": 0.25}
    assert forward_flops(costs, densities) == 2 * (24 * 0.5 + 12 * 0.25)
    summary = flops_summary(costs, densities)
    assert summary["dense_inference_flops"] == 72
    assert summary["inference_relative"] == pytest.approx(15 / 36)
    assert summary["training_flops"] == TRAINING_FACTOR * 30 and summary["dense_training_flops"] == 3 * 72
    assert summary["layers"]["3.weight"] == {"dense_flops": 24, "relative": 0.25}
    # training averaged over the run: half the steps dense, half at the final masks
    mean = (72 + 30) / 2
    assert flops_summary(costs, densities, mean_forward=mean)["training_relative"] == pytest.approx(mean / 72)


def test_conv_by_hand_on_meta_device() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2),
                              nn.Flatten(), nn.Linear(8 * 2 * 2, 10))
    costs = dense_costs(model, (3, 6, 6))
    first = 8 * 6 * 6 * 3 * 9           # output elements x (in channels / groups) x kernel
    second = 8 * 2 * 2 * 4 * 9           # 6x6 -> 2x2 at stride 2 without padding, 2 groups of 4 channels
    assert costs.layers == {"0.weight": first, "2.weight": second, "4.weight": 32 * 10}
    assert costs.total == first + second + 320
    only_first = forward_flops(costs, {"0.weight": 0.1})
    assert only_first == pytest.approx(2 * (first * 0.1 + second + 320))


class _Attention(nn.Module):
    """Linear projections plus the two attention products, which no weight owns."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_products_count_dense() -> None:
    tokens, dim = 5, 4
    costs = dense_costs(_Attention(dim), (tokens, dim))
    assert costs.layers == {"qkv.weight": tokens * dim * 3 * dim}
    assert costs.other == 2 * tokens * tokens * dim     # q k^T and (scores) v
    flops = forward_flops(costs, {"qkv.weight": 0.0})
    assert flops == 2 * costs.other


def test_model_left_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model.train()
    before = model[1].running_mean.clone()
    dense_costs(model, (3,), batch=2)
    assert model.training and not model[0]._forward_hooks
    assert torch.equal(model[1].running_mean, before)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_tied_weights_count_every_use() -> None:
    costs = dense_costs(_Tied(), (4,))
    assert costs.layers == {"a.weight": 16, "b.weight": 16} and costs.total == 32


def test_resnet50_matches_the_published_count() -> None:
    import models

    with torch.device("meta"):
        model = models.build_model("resnet50", in_channels=3, image_size=224, num_classes=1000)
    costs = dense_costs(model, (3, 224, 224))
    assert costs.total == pytest.approx(4.09e9, rel=2e-3)     # torchvision's table: 4.09 GFLOPS (multiply-adds)
    assert costs.other == 0 and len(costs.layers) == 54       # 53 convolutions and the classifier

"""Invariants over many steps: pruned weights exactly zero and never moved by momentum, Adam moments or decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from engine.backends import Backend, DistEnv
from engine.optim import OptimConfig, build_optimizer
from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig

OPTIMIZERS = [
    OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    OptimConfig(name="adam", lr=0.01, weight_decay=1e-4),
    OptimConfig(name="adamw", lr=0.01, weight_decay=0.1),
]


@pytest.mark.parametrize("optim_cfg", OPTIMIZERS, ids=lambda c: c.name)
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_pruned_weights_stay_exactly_zero(optim_cfg: OptimConfig, method: str) -> None:
    torch.manual_seed(0)
    model = models.build_model("conv", in_channels=1, image_size=8, num_classes=4)
    optimizer = build_optimizer(model, optim_cfg)
    sparsity = build_method(AtInitConfig(method=method, density=0.2, scope="layer", distribution="erk"), model,
                            optimizer, MethodContext(seed=3))
    sparsity.setup()
    backend = Backend(DistEnv(), torch.device("cpu"))
    backend.wrap(model)
    masks = {name: mask.clone() for name, mask in sparsity.masks.items()}
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for step in range(60):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        backend.backward(loss)
        backend.step(optimizer, lambda: sparsity.before_step(step), clip_grad_norm=1.0)
        for name, param in sparsity.params.items():
            assert (param[~masks[name]] == 0).all(), f"{name} moved a pruned weight at step {step}"
    moved = 0
    for name, param in sparsity.params.items():
        for value in optimizer.state[param].values():
            if torch.is_tensor(value) and value.shape == param.shape:
                assert (value[~masks[name]] == 0).all(), f"optimizer state of pruned {name} is non-zero"
        moved += int((param[masks[name]] != 0).sum())
    assert moved > 0
    assert sum(int(m.sum()) for m in masks.values()) == sum(s.kept for s in sparsity.layer_stats())


def test_every_masked_model_keeps_zeros_for_a_step() -> None:
    """Registry-wide: each model can be masked at 10% and one SGD step leaves pruned weights at exactly zero."""
    for name, size in [("mlp", 8), ("resnet20", 16), ("vgg11_bn", 32), ("wrn28_2", 16), ("vit_cifar", 16)]:
        torch.manual_seed(0)
        model = models.build_model(name, in_channels=3, image_size=size, num_classes=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        sparsity = build_method(AtInitConfig(method="random", density=0.1), model, optimizer, MethodContext())
        sparsity.setup()
        model(torch.randn(2, 3, size, size)).sum().backward()
        sparsity.before_step(0)
        optimizer.step()
        for pname, param in sparsity.params.items():
            assert (param[~sparsity.masks[pname]] == 0).all(), f"{name}: {pname}"

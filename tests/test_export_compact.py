"""``--format compact``: empty units removed with Torch-Pruning's dependency graph, counted by hand.

An empty unit's output is a constant; it is removed when that constant is zero where the next layers read it, or
folded into their bias when they are linears. Outputs must equal the masked model's within 1e-5 and the parameter
count must drop by exactly the hand-counted amount (the unit's row or filter, its bias and norm entries, and the
next layer's input column).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import models
from engine.run_config import load_config
from engine.trainer import train
from launcher.export import example_input, export, export_model, load_export, masked_model
from pruning.export import compact, write_export


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _manifest(name: str, channels: int, size: int) -> dict:
    return {"model": {"name": name, "options": {}},
            "input": {"channels": channels, "image_size": size, "num_classes": 10}}


@torch.no_grad()
def _lenet() -> nn.Module:
    torch.manual_seed(0)
    model = models.build_model("lenet_300_100", in_channels=1, image_size=28, num_classes=10).eval()
    model.features[0].weight[:50] = 0            # 50 empty hidden units in the first layer
    model.features[0].bias[:50].uniform_(-1, 1)  # their outputs are relu(bias): about half need folding
    model.features[2].weight[10:30] = 0          # 20 in the second
    return model


def test_unit_pruned_mlp_loses_exactly_its_empty_units(tmp_path: Path) -> None:
    model = _lenet()
    manifest = _manifest("lenet_300_100", 1, 28)
    x = example_input(manifest, 8, seed=3)
    with torch.no_grad():
        reference = model(x)
    before = _count(model)
    exported, tensors, full = export_model(model, manifest, "compact", torch.device("cpu"), report=lambda _: None)
    assert [exported.features[0].out_features, exported.features[2].out_features] == [250, 80]
    assert exported.classifier.in_features == 80
    # rows of layer 1 (784 + bias) * 50, its columns in layer 2 (100 * 50), rows of layer 2 (250 + bias) * 20,
    # and their columns in the classifier (10 * 20)
    assert before - _count(exported) == 50 * 785 + 100 * 50 + 20 * 251 + 10 * 20
    with torch.no_grad():
        torch.testing.assert_close(exported(x), reference, atol=1e-5, rtol=0)
    write_export(str(tmp_path / "c"), tensors, full)
    loaded, _ = load_export(str(tmp_path / "c"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference, atol=1e-5, rtol=0)
    assert _count(loaded) == _count(exported)


@torch.no_grad()
def test_unit_pruned_resnet20_inner_and_residual_channels() -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", in_channels=3, image_size=32, num_classes=10).eval()
    model.layer1[0].conv1.weight[:5] = 0
    model.layer3[2].conv1.weight[:10] = 0
    # residual channel 7 of stage 2: empty only where every producer of it is (shortcut conv and all conv2s)
    for block in model.layer2:
        block.conv2.weight[7] = 0
    model.layer2[0].downsample[0].weight[7] = 0
    model.layer2[1].conv2.weight[9] = 0            # one producer of channel 9 alone: it must stay
    x = torch.randn(4, 3, 32, 32)
    reference = model(x)
    before = _count(model)
    with torch.enable_grad():
        groups, biased = compact(model, x)
    assert biased == []
    assert model.layer1[0].conv1.out_channels == 11 and model.layer3[2].conv1.out_channels == 54
    assert model.layer2[1].conv2.out_channels == 31 and model.layer2[0].downsample[0].out_channels == 31
    inner = 5 * (16 * 9 + 2 + 16 * 9) + 10 * (64 * 9 + 2 + 64 * 9)
    # stage 2's channel 7: 3 conv2 filters (32 * 9), the 1x1 shortcut filter (16), 4 norm pairs, the inputs of
    # layer2.{1,2}.conv1 and layer3.0.conv1 (32 * 9 / 64 * 9 each) and of layer3.0's shortcut (64)
    residual = 3 * 32 * 9 + 16 + 4 * 2 + 2 * 32 * 9 + 64 * 9 + 64
    assert before - _count(model) == inner + residual
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)


def test_a_constant_into_a_padded_conv_keeps_its_unit() -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", in_channels=3, image_size=32, num_classes=10).eval()
    with torch.no_grad():
        model.layer1[0].conv1.weight[:2] = 0
        model.layer1[0].bn1.bias[0] = 0.5          # relu(0.5) reaches the padded conv2: cannot be folded
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    groups, _ = compact(model, x)
    assert [(g.removed, g.kept_empty) for g in groups] == [(1, 1)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_attention_channels_stay_and_mlp_units_go() -> None:
    torch.manual_seed(0)
    model = models.build_model("vit_strip", in_channels=3, image_size=16, num_classes=10, dim=16, depth=1, heads=2,
                               patch_size=8).eval()
    block = model.blocks[0]
    block.attn.q.weight[:4] = 0                  # q's constant meets k in a product: not removable
    block.mlp.fc1.weight[:5] = 0
    block.mlp.fc1.bias[:5] = torch.tensor([0.3, -0.2, 0.0, 1.0, -1.0])   # 2 of them fold into fc2's bias
    x = torch.randn(2, 3, 16, 16)
    reference = model(x)
    with torch.enable_grad():
        groups, _ = compact(model, x)
    assert [(g.root, g.removed, g.folded) for g in groups] == [("blocks.0.mlp.fc1", 5, 2)]
    assert block.attn.q.out_features == 16 and block.mlp.fc1.out_features == block.mlp.fc2.in_features
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)


def test_nothing_empty_is_refused() -> None:
    model = models.build_model("lenet_300_100", in_channels=1, image_size=28, num_classes=10).eval()
    with pytest.raises(ValueError, match="no empty unit"):
        export_model(model, _manifest("lenet_300_100", 1, 28), "compact", torch.device("cpu"), report=lambda _: None)


def test_a_unit_pruned_run_exports_compact_end_to_end(tmp_path: Path) -> None:
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", "data.name=digits", "model.name=lenet_300_100",
                             "sparsity.method=unit", "sparsity.schedule.name=one_shot_init",
                             "sparsity.schedule.final_sparsity=0.5", "train.epochs=1", "train.max_steps_per_epoch=3",
                             "train.device=cpu", "monitor.progress=false", "monitor.tensorboard=false"])
    train(cfg)
    lines: list[str] = []
    export(str(tmp_path / "run"), "compact", str(tmp_path / "compact"), report=lines.append)
    assert len(lines) == 2
    loaded, manifest = load_export(str(tmp_path / "compact"))
    # digits are 8x8: 64 -> 150 -> 50 -> 10 kept of 64 -> 300 -> 100 -> 10
    assert _count(loaded) == 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    masked, _ = masked_model(str(tmp_path / "run"), [])
    x = example_input(manifest, 8, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked(x), atol=1e-5, rtol=0)

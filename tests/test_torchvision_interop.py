"""Our ImageNet ResNets are torchvision's layer for layer: state dicts load strictly both ways, outputs agree.

The names matter to anyone who takes a trained sparse model elsewhere (torchvision's pretrained-weight tooling,
detection backbones, other pruning libraries), so a rename here would be a breaking change caught by these tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from engine.run_config import load_config
from engine.trainer import train
from models.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _ours(name: str, num_classes: int) -> nn.Module:
    return build_model(name, in_channels=3, image_size=64, num_classes=num_classes).eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_loads_strictly_into_torchvision_with_the_same_outputs(name: str) -> None:
    torch.manual_seed(0)
    ours = _ours(name, 10)
    for module in ours.modules():          # non-trivial BN statistics, so eval-mode outputs depend on every buffer
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(3)
    theirs = getattr(torchvision.models, name)(num_classes=10).eval()
    assert list(theirs.state_dict()) == list(ours.state_dict())      # same names in the same order
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(theirs(x), expected, rtol=0, atol=0)
    back = _ours(name, 10)                   # and the other way round
    back.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, rtol=0, atol=0)


def test_projection_is_torchvisions_downsample_and_keeps_its_role() -> None:
    from models.common import get_role

    modules = dict(_ours("resnet50", 10).named_modules())
    assert isinstance(modules["layer1.0.downsample"], nn.Sequential)
    assert isinstance(modules["layer1.0.downsample.0"], nn.Conv2d)
    assert isinstance(modules["layer1.0.downsample.1"], nn.BatchNorm2d)
    assert get_role(modules["layer1.0.downsample.0"]) == "shortcut"    # pruning's role name is unchanged
    assert modules["layer1.1"].downsample is None and not any("shortcut" in n for n in modules)


def test_a_trained_sparse_checkpoint_runs_in_torchvision(tmp_path: Path) -> None:
    """A short masked run of resnet18 (imagenet stem, synthetic 32 px data); the checkpoint's model state goes into
    torchvision.models.resnet18 strictly, keeps its zeros and gives the logits of our model with the same state."""
    cfg = load_config(None, [
        f"output_dir={tmp_path}", "name=tv", "model.name=resnet18", "data.name=synthetic", "data.image_size=32",
        "data.batch_size=4", "data.options.train_size=8", "data.options.test_size=4", "train.epochs=1",
        "train.device=cpu", "optim.name=sgd", "optim.lr=0.01", "sparsity.method=magnitude", "sparsity.density=0.2",
        "monitor.progress=false", "monitor.tensorboard=false"])
    train(cfg)
    checkpoint = sorted((tmp_path / "tv" / "checkpoints").glob("ckpt-*.pt"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    theirs = torchvision.models.resnet18(num_classes=10).eval()
    theirs.load_state_dict(state, strict=True)
    assert float((theirs.layer3[1].conv2.weight == 0).float().mean()) > 0.5   # the mask travelled with the weights
    ours = _ours("resnet18", 10)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)

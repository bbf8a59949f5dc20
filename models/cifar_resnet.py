"""CIFAR ResNet (He et al. 2016, section 4.2): depth 6n+2, a 3x3 stem and three stages of n basic blocks.

Stage widths are w, 2w, 4w (w = 16 in the paper; the Union Mask paper uses w = 32). Where the shape changes the
shortcut is a 1x1 conv + BN projection (the paper's option B), tagged "shortcut" so pruning methods can exclude it.
This is the Synaptic Flow lottery ResNet (open_lth's design) and the Union Mask (`sparsity`) ResNet layer for layer,
except that Synaptic Flow's identity shortcuts carry a learnable per-channel scale (initialised to 1, not pruned) that
ours do not have (docs/models.md).

`init` (models/common.py): "default" is He-normal fan_out convs, identity BN and PyTorch's default linear; the
Synaptic Flow seed's own is "fan_in", the Union Mask seed's "xavier".
"""

from typing import Callable

import torch
import torch.nn as nn

from models.common import Init, init_conv_bn, init_weights, require_positive, set_role
from models.registry import register_model
from models.resnet import BasicBlock, make_stage


class CifarResNet(nn.Module):
    """3x3 stem conv -> 3 stages of basic blocks (strides 1, 2, 2) -> global average pool -> linear."""

    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int, width: int,
                 init: Init = "default") -> None:
        super().__init__()
        self.conv1 = set_role(nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False), "stem")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_stage(BasicBlock, width, width, blocks_per_stage, stride=1)
        self.layer2 = make_stage(BasicBlock, width, 2 * width, blocks_per_stage, stride=2)
        self.layer3 = make_stage(BasicBlock, 2 * width, 4 * width, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = set_role(nn.Linear(4 * width, num_classes), "classifier")
        if init == "default":
            init_conv_bn(self)
        else:
            init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


DEPTHS = (20, 32, 44, 56, 110)


def _make_builder(depth: int) -> Callable[..., nn.Module]:
    """One registered builder per depth; `width` is the first stage's channel count."""
    blocks_per_stage = (depth - 2) // 6

    def build(in_channels: int, image_size: int, num_classes: int, *, width: int = 16,
              init: Init = "default") -> nn.Module:
        require_positive(width=width)
        return CifarResNet(blocks_per_stage, in_channels, num_classes, width, init)

    build.__doc__ = f"CIFAR ResNet-{depth}: {blocks_per_stage} basic blocks per stage, widths w, 2w, 4w."
    build.__name__ = f"resnet{depth}"
    return build


for _depth in DEPTHS:
    register_model(f"resnet{_depth}")(_make_builder(_depth))

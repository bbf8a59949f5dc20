"""Pre-activation WideResNet (Zagoruyko & Komodakis 2016): WRN-depth-k for CIFAR-sized inputs.

depth = 6n + 4 with n blocks per stage and widths 16k, 32k, 64k. Like the reference code, a projection shortcut
(a bare 1x1 conv, tagged "shortcut") reads the pre-activated input, and the network ends with BN-ReLU before pooling.
WRN-28-2 is the DSR paper's model layer for layer. `init` (models/common.py): "default" is He-normal fan_out convs,
identity BN, PyTorch's default linear weight and a zero linear bias (the DSR code's scheme).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import Init, ModelConfigError, init_conv_bn, init_weights, require_positive, set_role
from models.registry import preset, register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 with an identity or 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            conv = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            self.shortcut = set_role(conv, "shortcut")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """3x3 stem conv (16 channels) -> 3 stages of pre-activation blocks -> BN-ReLU -> global pool -> linear."""

    def __init__(self, depth: int, widen_factor: int, dropout: float, in_channels: int, num_classes: int,
                 init: Init = "default") -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = set_role(nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False), "stem")
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(PreActBlock(in_planes, planes, stride, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = set_role(nn.Linear(widths[3], num_classes), "classifier")
        if init == "default":
            init_conv_bn(self)
            nn.init.zeros_(self.fc.bias)
        else:
            init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("wide_resnet")
def wide_resnet(
    in_channels: int,
    image_size: int,
    num_classes: int,
    *,
    depth: int = 28,
    widen_factor: int = 2,
    dropout: float = 0.0,
    init: Init = "default",
) -> nn.Module:
    """WRN-depth-widen_factor; dropout sits between the two convs of every block, as in the paper."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ModelConfigError(
            f"depth {depth} is invalid: (depth - 4) must be a positive multiple of 6; set depth to e.g. 16, 22, 28, 40"
        )
    require_positive(widen_factor=widen_factor)
    if not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"option dropout must be in [0, 1), got {dropout}")
    return WideResNet(depth, widen_factor, float(dropout), in_channels, num_classes, init)


register_model("wrn28_2")(preset(wide_resnet, depth=28, widen_factor=2))
register_model("wrn28_10")(preset(wide_resnet, depth=28, widen_factor=10))

"""ImageNet-style ResNet (He et al. 2016): resnet18/34 (basic blocks) and resnet50/101/152 (bottlenecks).

Bottlenecks put the stride on the 3x3 conv ("ResNet v1.5"), the variant every modern recipe trains. The `cifar` stem
(3x3 stride 1, no max-pool) keeps small images (CIFAR, Tiny ImageNet) from being downsampled 4x before stage 1.
resnet18 with the cifar stem is Synaptic Flow's Tiny ImageNet ResNet-18 (also used at CIFAR), resnet50 the DSR
paper's ResNet-50 (docs/models.md). `init` (models/common.py): "default" is He-normal fan_out convs, identity BN and
PyTorch's default linear (torchvision's scheme, and both seeds'). Module names are torchvision's (conv1, bn1,
layer1..4, fc; blocks conv1..bn3 and `downsample`), so with the imagenet stem a state dict loads strictly into
`torchvision.models.resnet18/34/50/101/152` and gives the same outputs (tests/test_torchvision_interop.py).
"""

from typing import Callable, Literal

import torch
import torch.nn as nn

from models.common import Init, init_conv_bn, init_weights, require_positive, set_role
from models.registry import register_model

Stem = Literal["imagenet", "cifar"]


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN projection (tagged "shortcut") when the residual changes shape, else None (identity).

    Blocks hold it as ``downsample``, torchvision's name, so a state dict loads into ``torchvision.models.resnet*``.
    """
    if stride == 1 and in_planes == out_planes:
        return None
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(set_role(conv, "shortcut"), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; shared with the CIFAR ResNets."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch, zeroed by zero_init_residual."""
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand by 4, with a residual connection."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch, zeroed by zero_init_residual."""
        return self.bn3


Block = type[BasicBlock] | type[Bottleneck]


def make_stage(block: Block, in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` residual blocks; only the first one strides and changes width."""
    layers = [block(in_planes, planes, stride)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def zero_init_last_bn(model: nn.Module) -> None:
    """Start each residual branch at zero so every block begins as the identity (Goyal et al. 2017)."""
    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            nn.init.zeros_(module.last_bn().weight)


class ResNet(nn.Module):
    """Stem, four stages (widths 64k, 128k, 256k, 512k times the block expansion), global pool, linear."""

    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        in_channels: int,
        num_classes: int,
        stem: Stem = "imagenet",
        width_factor: int = 1,
        zero_init_residual: bool = False,
        init: Init = "default",
    ) -> None:
        super().__init__()
        base = 64 * width_factor
        if stem == "imagenet":
            conv1 = nn.Conv2d(in_channels, base, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            conv1 = nn.Conv2d(in_channels, base, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.conv1 = set_role(conv1, "stem")
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], base
        for i, blocks in enumerate(layers):
            planes = base * 2**i
            stages.append(make_stage(block, in_planes, planes, blocks, stride=1 if i == 0 else 2))
            in_planes = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = set_role(nn.Linear(in_planes, num_classes), "classifier")
        if init == "default":
            init_conv_bn(self)
        else:
            init_weights(self, init)
        if zero_init_residual:
            zero_init_last_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


CONFIGS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def _make_builder(name: str) -> Callable[..., nn.Module]:
    """One registered builder per depth, all with the same typed options."""
    block, layers = CONFIGS[name]

    def build(
        in_channels: int,
        image_size: int,
        num_classes: int,
        *,
        stem: Stem = "imagenet",
        width_factor: int = 1,
        zero_init_residual: bool = False,
        init: Init = "default",
    ) -> nn.Module:
        require_positive(width_factor=width_factor)
        return ResNet(block, layers, in_channels, num_classes, stem, width_factor, zero_init_residual, init)

    build.__doc__ = (
        f"{name}: stem 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1); width_factor k scales every width to "
        "64k..512k (resnet18 with k=2 is Synaptic Flow's WideResNet-18)."
    )
    build.__name__ = name
    return build


for _name in CONFIGS:
    register_model(_name)(_make_builder(_name))

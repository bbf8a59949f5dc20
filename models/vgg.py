"""CIFAR-style VGG (Simonyan & Zisserman configs): 3x3 convs and max-pools, global average pool, one linear.

The single 512 -> num_classes classifier (instead of ImageNet VGG's three big FC layers) is the variant used by the
pruning-at-initialisation papers; VGG-16 therefore has exactly 13 convs + 1 linear = 14 prunable layers, which the
Synaptic Flow layer-collapse experiment relies on.
"""

from typing import Callable

import torch
import torch.nn as nn

from models.common import init_conv_bn, set_role
from models.registry import register_model

# Channel counts of the conv layers; "M" is a 2x2 max-pool.
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """Conv feature stack from a config, then adaptive average pool to 1x1 and one linear classifier.

    Pools that would shrink the map below 1x1 are skipped, so inputs smaller than 32 px still build and run.
    Convs keep their bias even with batch norm, matching the reference implementations and parameter counts.
    """

    def __init__(
        self, config: list[int | str], in_channels: int, image_size: int, num_classes: int, batch_norm: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in config:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    size //= 2
                continue
            conv = nn.Conv2d(channels, int(item), kernel_size=3, padding=1)
            layers.append(set_role(conv, "stem") if not layers else conv)
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(item)))
            layers.append(nn.ReLU(inplace=True))
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = set_role(nn.Linear(channels, num_classes), "classifier")
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _make_builder(name: str, batch_norm: bool) -> Callable[..., nn.Module]:
    """One registered builder per config; VGG has no options, the name says everything."""
    config = CONFIGS[name]

    def build(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        return VGG(config, in_channels, image_size, num_classes, batch_norm)

    suffix = " with batch norm" if batch_norm else ""
    build.__doc__ = f"CIFAR-style {name.upper()}{suffix}: global average pool and one linear classifier."
    build.__name__ = f"{name}_bn" if batch_norm else name
    return build


for _name in CONFIGS:
    register_model(_name)(_make_builder(_name, batch_norm=False))
    register_model(f"{_name}_bn")(_make_builder(_name, batch_norm=True))

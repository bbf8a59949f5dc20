"""CIFAR-sized VGGs (Simonyan & Zisserman's configs A/B/D/E) in the three designs the seed experiments use.

``variant`` picks the design; each is the seed's definition at its own input size (docs/models.md has the layer
lists, parameter counts and forward checks):

- ``lottery`` (default): the Synaptic Flow lottery VGG (open_lth's design, Synaptic-Flow Models/lottery_vgg.py).
  No max-pool after the last stage, then a 2x2 average pool, flatten, one Linear(512, classes). Convs keep their bias
  (with or without batch norm); the BN variants are conv -> BN -> ReLU. VGG-16 therefore has 13 convs + 1 linear = 14
  prunable layers, which the Synaptic Flow layer-collapse experiment relies on.
- ``tinyimagenet``: Synaptic Flow's Tiny ImageNet VGG (Models/tinyimagenet_vgg.py, from pytorch-cifar100): all five
  max-pools, flatten, Linear(512*s*s, 1024) -> ReLU -> Dropout(0.5) -> Linear(1024, 1024) -> ReLU -> Dropout(0.5) ->
  Linear(1024, classes), s the final map side (2 at 64 px: the seed's 2048 inputs). Its default init is the seed's:
  He-normal fan_out convs, linears N(0, 0.01), biases 0.
- ``union_mask``: the Union Mask (`sparsity`) code's VGG (src/models/vgg.py): all five max-pools, convs without bias,
  flatten, Linear(512*s*s, 512, no bias) -> ReLU -> Linear(512, 512, no bias) -> ReLU -> Linear(512, classes). Its
  default init is the seed's: He-normal fan_out convs, Xavier-uniform hidden linears, PyTorch's default classifier.

Other input sizes (the digits data are 8x8, MNIST 28x28): a max-pool that would shrink the map below 1x1 is skipped,
and the lottery design averages whatever final map is left to 1x1 (at 32 px that is exactly the seed's 2x2 average
pool); the flattening designs size their first linear from the final map. At 32 px every design is the seed's.

``init`` takes the shared schemes of models/common.py; ``default`` is the variant's own scheme (lottery: He-normal
fan_out convs with zero biases, identity BN, PyTorch's default linear; the seed's own init is ``fan_in``).
"""

from typing import Callable, Literal

import torch
import torch.nn as nn

from models.common import Init, init_conv_bn, init_weights, set_role
from models.registry import register_model

Variant = Literal["lottery", "tinyimagenet", "union_mask"]

# Channel counts of the conv layers; "M" is a 2x2 max-pool. The lottery design drops the last "M".
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _features(config: list[int | str], in_channels: int, image_size: int, batch_norm: bool,
              bias: bool) -> tuple[nn.Sequential, int, int]:
    """The conv stack; returns it with its output channels and final map side."""
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for item in config:
        if item == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            continue
        conv = nn.Conv2d(channels, int(item), kernel_size=3, padding=1, bias=bias)
        layers.append(set_role(conv, "stem") if not layers else conv)
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(item)))
        layers.append(nn.ReLU(inplace=True))
        channels = int(item)
    return nn.Sequential(*layers), channels, size


class VGG(nn.Module):
    """features -> pool (lottery: average to 1x1; otherwise identity) -> flatten -> classifier."""

    def __init__(self, config: list[int | str], in_channels: int, image_size: int, num_classes: int,
                 batch_norm: bool, variant: Variant = "lottery", init: Init = "default") -> None:
        super().__init__()
        plan = config[:-1] if variant == "lottery" else config
        self.features, channels, size = _features(plan, in_channels, image_size, batch_norm,
                                                  bias=variant != "union_mask")
        self.pool: nn.Module
        self.classifier: nn.Module
        if variant == "lottery":
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = set_role(nn.Linear(channels, num_classes), "classifier")
        else:
            self.pool = nn.Identity()
            flat = channels * size * size
            if variant == "tinyimagenet":
                self.classifier = nn.Sequential(
                    nn.Linear(flat, 1024), nn.ReLU(inplace=True), nn.Dropout(0.5),
                    nn.Linear(1024, 1024), nn.ReLU(inplace=True), nn.Dropout(0.5),
                    set_role(nn.Linear(1024, num_classes), "classifier"))
            else:
                self.classifier = nn.Sequential(
                    nn.Linear(flat, 512, bias=False), nn.ReLU(inplace=True),
                    nn.Linear(512, 512, bias=False), nn.ReLU(inplace=True),
                    set_role(nn.Linear(512, num_classes), "classifier"))
        if init != "default":
            init_weights(self, init)
        elif variant == "lottery":
            init_conv_bn(self)
        else:
            self._seed_default_init(variant)

    def _seed_default_init(self, variant: Variant) -> None:
        """The tinyimagenet / union_mask seeds' own schemes, in module order (convs come before the classifier)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and variant == "tinyimagenet":
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and module.bias is None:      # union_mask's hidden linears
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _make_builder(name: str, batch_norm: bool) -> Callable[..., nn.Module]:
    """One registered builder per config; `variant` picks the seed design, `init` the initialisation scheme."""
    config = CONFIGS[name]

    def build(in_channels: int, image_size: int, num_classes: int, *, variant: Variant = "lottery",
              init: Init = "default") -> nn.Module:
        return VGG(config, in_channels, image_size, num_classes, batch_norm, variant, init)

    suffix = " with batch norm" if batch_norm else ""
    build.__doc__ = (f"{name.upper()}{suffix}: variant 'lottery' (Synaptic Flow / open_lth, default), "
                     "'tinyimagenet' (Synaptic Flow's 64 px VGG) or 'union_mask' (the `sparsity` code's VGG).")
    build.__name__ = f"{name}_bn" if batch_norm else name
    return build


for _name in CONFIGS:
    register_model(_name)(_make_builder(_name, batch_norm=False))
    register_model(f"{_name}_bn")(_make_builder(_name, batch_norm=True))

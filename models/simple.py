"""Small baselines: a fully connected MLP (LeNet-300-100 style) and a small conv net for 8-32 px inputs.

The MLP's `batch_norm` and `init` options give the DSR code's LeNet-300-100 (Intel's mnist_mlp: no biases, a
BatchNorm1d after every linear including the last, weights U(-1/sqrt(fan_in), 1/sqrt(fan_in))):
`{bias: false, batch_norm: true, init: uniform}`. docs/models.md compares it with the seed.
"""

import torch
import torch.nn as nn

from models.common import Init, ModelConfigError, init_conv_bn, init_weights, require_positive, set_role
from models.registry import preset, register_model


class MLP(nn.Module):
    """Flatten -> [Linear (-> BN) -> ReLU]* -> Linear (-> BN); the classic dense baseline of the pruning literature.

    Default init: He-normal (fan_in) hidden layers with zero biases, PyTorch's default classifier. With `batch_norm`
    every linear, the classifier too, is followed by a BatchNorm1d (`out_norm` after the classifier), as in DSR.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, bias: bool = True,
                 batch_norm: bool = False, init: Init = "default") -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            linear = nn.Linear(fan_in, fan_out, bias=bias)
            if init == "default":
                nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
                if bias:
                    nn.init.zeros_(linear.bias)
            layers.append(set_role(linear, "stem") if i == 0 else linear)
            if batch_norm:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.classifier = set_role(nn.Linear(sizes[-1], num_classes, bias=bias), "classifier")
        self.out_norm = nn.BatchNorm1d(num_classes) if batch_norm else nn.Identity()
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.classifier(self.features(torch.flatten(x, 1))))


@register_model("mlp")
def mlp(
    in_channels: int,
    image_size: int,
    num_classes: int,
    *,
    hidden: list[int] = [300, 100],  # noqa: B006 - never mutated; a list so YAML lists type-check
    bias: bool = True,
    batch_norm: bool = False,
    init: Init = "default",
) -> nn.Module:
    """MLP on flattened images; `hidden` lists the hidden layer widths, `batch_norm` adds BN after every linear."""
    if not hidden:
        # A stem and a classifier must be distinct layers, so a bare logistic regression is not an MLP here.
        raise ModelConfigError("option hidden must list at least one hidden layer width, e.g. [300, 100]")
    for width in hidden:
        if width < 1:
            raise ModelConfigError(f"option hidden must hold positive widths, got {list(hidden)}")
    return MLP(in_channels * image_size * image_size, list(hidden), num_classes, bias=bias, batch_norm=batch_norm,
               init=init)


register_model("lenet_300_100")(preset(mlp, hidden=[300, 100]))


class ConvNet(nn.Module):
    """Three conv3x3 -> ReLU -> max-pool blocks (widths w, 2w, 4w) then one linear on the flattened map.

    Pools are skipped once the map is 1x1, so inputs from 8 px (three halvings to 1x1) up to 32 px work.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int) -> None:
        super().__init__()
        widths = [in_channels, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        size = image_size
        for i in range(3):
            conv = nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, padding=1)
            layers += [set_role(conv, "stem") if i == 0 else conv, nn.ReLU(inplace=True)]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = set_role(nn.Linear(widths[-1] * size * size, num_classes), "classifier")
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("conv")
def conv(in_channels: int, image_size: int, num_classes: int, *, width: int = 32) -> nn.Module:
    """Small conv net; `width` is the first block's channel count (then 2x, 4x)."""
    require_positive(width=width)
    return ConvNet(in_channels, image_size, num_classes, width)

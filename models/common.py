"""Pieces every model family shares: sparsity roles, config errors, standard initialisation.

Roles are a plain attribute on a layer so that the pruning code can decide per method which layers to exclude
(stem, shortcut, classifier, ...) without models knowing anything about pruning. Untagged Conv2d/Linear layers are
"body" layers.

Initialisation schemes (the ``init`` option of every seed family: vgg*, resnet20..110, resnet18..152, wide_resnet,
mlp; docs/models.md says which seed uses which):

- ``default``: the family's own scheme, as documented on the family (unchanged by this option);
- ``fan_in``: He-normal with fan_in on every conv and linear weight (``torch.nn.init.kaiming_normal_`` with its
  defaults: std sqrt(2 / fan_in)), every conv and linear bias zero, norm weights 1 and biases 0. The Synaptic Flow
  lottery VGGs and ResNets (open_lth's scheme);
- ``uniform``: every conv and linear weight U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default weight
  distribution), every conv and linear bias zero, norms 1 and 0. The DSR code's MLP (its sparse tensors' init);
- ``xavier``: Xavier-normal on every conv and linear weight except 1x1 shortcut convs (role "shortcut"), which keep
  PyTorch's constructor init like every bias does; norms 1 and 0. The Union Mask (`sparsity`) code's CIFAR ResNets.

A non-default scheme replaces the family's default draw (it is not drawn on top of it), so a family built in the
seed's layer order under the same torch seed draws the seed's weights.
"""

import math
from typing import Literal

import torch.nn as nn

Init = Literal["default", "fan_in", "uniform", "xavier"]
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)

ROLES = (
    "stem",  # the first layer that consumes the input
    "classifier",  # the final output layer
    "shortcut",  # 1x1 projection convs on residual paths
    "patch_embed",  # ViT patch embedding: the ViT's input layer, i.e. its stem
    "attn_qkv",
    "attn_out",
    "mlp_fc1",
    "mlp_fc2",
)
INPUT_ROLES = ("stem", "patch_embed")


class ModelConfigError(ValueError):
    """A bad model configuration found while building; the registry prefixes it with the model name."""


def set_role(module: nn.Module, role: str) -> nn.Module:
    """Tag `module` with a sparsity role and return it, so tagging can wrap a constructor inline."""
    if role not in ROLES:
        raise ValueError(f"unknown sparsity role {role!r}; valid roles: {', '.join(ROLES)}")
    module.sparsity_role = role
    return module


def get_role(module: nn.Module) -> str | None:
    """The sparsity role of a layer, or None for an untagged (body) layer."""
    return getattr(module, "sparsity_role", None)


def init_conv_bn(model: nn.Module) -> None:
    """He (fan_out) init for convs and identity BN: the torchvision/He et al. defaults for ReLU conv nets.

    Linear layers keep PyTorch's default init unless a family chooses otherwise.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def require_positive(**values: int) -> None:
    """Raise a ModelConfigError for the first option that is not >= 1 (widths, depths, sizes)."""
    for key, value in values.items():
        if value < 1:
            raise ModelConfigError(f"option {key} must be >= 1, got {value}")



def init_weights(model: nn.Module, init: Init) -> None:
    """Apply a named scheme to every conv, linear and norm layer in module order; "default" leaves the model alone.

    Families call it after construction instead of their own default init when ``init != "default"``.
    """
    if init == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            _init_layer(module, init)
        elif isinstance(module, _NORMS) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _init_layer(layer: nn.Conv2d | nn.Linear, init: Init) -> None:
    if init == "fan_in":
        nn.init.kaiming_normal_(layer.weight)             # a=0, mode="fan_in": std sqrt(2 / fan_in)
    elif init == "uniform":
        fan_in = layer.weight[0].numel()
        nn.init.uniform_(layer.weight, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
    elif init == "xavier":
        if get_role(layer) != "shortcut":
            nn.init.xavier_normal_(layer.weight)
        return                                            # biases keep the constructor's draw
    else:
        raise ValueError(f"unknown init scheme {init!r}; valid: default, fan_in, uniform, xavier")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)

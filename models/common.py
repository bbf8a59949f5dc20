"""Pieces every model family shares: sparsity roles, config errors, standard initialisation.

Roles are a plain attribute on a layer so that the pruning code can decide per method which layers to exclude
(stem, shortcut, classifier, ...) without models knowing anything about pruning. Untagged Conv2d/Linear layers are
"body" layers.
"""

import torch.nn as nn

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


"""Which parameters are prunable: chosen by rule, keyed by fully qualified name on the unwrapped model.

Models mark layers with a ``sparsity_role`` attribute (stem, classifier, shortcut, patch_embed, attn_qkv, attn_out,
mlp_fc1, mlp_fc2); untagged layers are the body. Methods differ in what they keep dense (SynFlow prunes first and
last layers, DSR keeps the stem, shortcuts and classifier dense), so the rule is part of each method's config.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

LayerKind = Literal["conv", "linear"]
ROLES = ("stem", "classifier", "shortcut", "patch_embed", "attn_qkv", "attn_out", "mlp_fc1", "mlp_fc2", "body")
_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
}


@dataclass
class TargetConfig:
    """Rule selecting prunable weights: layer kinds, minus excluded roles and name patterns."""

    layers: list[LayerKind] = field(default_factory=lambda: ["conv", "linear"])   # layer kinds that are prunable
    exclude_roles: list[str] = field(default_factory=list)   # roles kept dense: stem, shortcut, classifier...
    exclude: list[str] = field(default_factory=list)   # fnmatch patterns on parameter names, e.g. "head.*"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers must name at least one kind of layer: conv, linear")
        bad = [r for r in self.exclude_roles if r not in ROLES]
        if bad:
            raise ValueError(f"exclude_roles has unknown role '{bad[0]}'; valid roles: {', '.join(ROLES)}")


def layer_role(module: nn.Module) -> str:
    """The role a model gave a layer, 'body' when untagged."""
    return getattr(module, "sparsity_role", "body")


def prunable_parameters(model: nn.Module, rule: TargetConfig) -> dict[str, nn.Parameter]:
    """Weights matching ``rule``, in module order, keyed by parameter name (e.g. ``layer1.0.conv1.weight``)."""
    kinds = tuple(t for kind in rule.layers for t in _KINDS[kind])
    chosen: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, kinds) or layer_role(module) in rule.exclude_roles:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in rule.exclude):
            continue
        chosen[name] = weight
    if not chosen:
        raise ValueError("targets select no parameter of this model; loosen sparsity.targets "
                         "(layers, exclude_roles, exclude)")
    return chosen

"""The dense baseline: no masks, every weight trained; accounting still reports the prunable layers."""

from __future__ import annotations

from pruning.methods.base import MethodConfig, SparsityMethod, register_method


@register_method("dense")
class Dense(SparsityMethod):
    """No sparsity: the reference every sparse run is compared with."""

    Config = MethodConfig

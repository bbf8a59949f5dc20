"""Unit (structured) pruning: remove whole output units, rows of a linear weight or filters of a conv, by L2 norm.

On a sparsity schedule (``pruning.schedules``), each prune keeps the units with the largest L2 norm of their weights:
*layer* scope keeps round(density * units) units in every layer, *global* scope keeps round(density * all units) with
one threshold across layers (sparsity then counts units, not weights; a layer can lose all its units). Masks cover
whole rows / filters. Biases are never pruned (as everywhere in the project). ``carry_mask`` as in gradual pruning:
on, pruned units stay pruned; off, pruned units compete with the norm of their stored weights and come back with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pruning.methods.base import register_method
from pruning.methods.gradual import OnSchedule, OnScheduleConfig

UnitScope = Literal["layer", "global"]
UNIT_SCOPES = {"layer": "neuron_layer", "global": "neuron_global"}   # config word -> registered scope


@dataclass
class UnitConfig(OnScheduleConfig):
    """The schedule's sparsity is the fraction of units pruned; scope: layer or global."""

    scope: UnitScope = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in UNIT_SCOPES:
            raise ValueError(f"scope must be layer or global, got {self.scope!r}")


@register_method("unit")
class UnitPruning(OnSchedule):
    """Prune whole output units with the smallest L2 norm at every prune time of the schedule (the neuron scopes
    score a unit by the L2 norm of its weights, stored values for pruned ones)."""

    Config = UnitConfig
    config: UnitConfig
    scope_names: ClassVar[dict[str, str]] = UNIT_SCOPES


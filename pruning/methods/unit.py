"""Unit (structured) pruning: remove whole output units, rows of a linear weight or filters of a conv, by L2 norm.

On a sparsity schedule (``pruning.schedules``), each prune keeps the units with the largest L2 norm of their weights:
*layer* scope keeps round(density * units) units in every layer, *global* scope keeps round(density * all units) with
one threshold across layers (sparsity then counts units, not weights; a layer can lose all its units). Masks cover
whole rows / filters. Biases are never pruned (as everywhere in the project). ``carry_mask`` as in gradual pruning:
on, pruned units stay pruned; off, pruned units compete with the norm of their stored weights and come back with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from pruning.methods.base import register_method
from pruning.methods.gradual import OnSchedule, OnScheduleConfig, keep_count
from pruning.selection import global_top_k, keep_top_k

UnitScope = Literal["layer", "global"]


@dataclass
class UnitConfig(OnScheduleConfig):
    """The schedule's sparsity is the fraction of units pruned; scope: layer or global."""

    scope: UnitScope = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be layer or global, got {self.scope!r}")


def unit_mask(keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Expand a per-unit keep vector to the weight's shape (unit = index along dim 0)."""
    return keep.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


@register_method("unit")
class UnitPruning(OnSchedule):
    """Prune whole output units with the smallest L2 norm at every prune time of the schedule."""

    Config = UnitConfig
    config: UnitConfig

    def unit_scores(self) -> dict[str, torch.Tensor]:
        """L2 norm per output unit (stored weights for pruned units); -inf for pruned units under carry_mask."""
        assert self.masks is not None
        scores = {}
        for name, w in self.effective_weights().items():
            norms = w.reshape(w.shape[0], -1).float().norm(dim=1)
            if self.config.carry_mask:
                alive = self.masks[name].reshape(w.shape[0], -1).any(dim=1)
                norms = norms.masked_fill(~alive, -math.inf)
            scores[name] = norms
        return scores

    def alive_units(self) -> dict[str, int]:
        assert self.masks is not None
        return {name: int(m.reshape(m.shape[0], -1).any(dim=1).sum()) for name, m in self.masks.items()}

    def prune_at(self, t: int) -> None:
        if not self.schedule.is_prune_step(t):
            return
        sparsity = self.schedule.sparsity(t)
        density, carry = 1.0 - sparsity, self.config.carry_mask
        scores, alive = self.unit_scores(), self.alive_units()
        if self.config.scope == "global":
            k = keep_count(density, sum(s.numel() for s in scores.values()))
            keep = global_top_k(scores, min(k, sum(alive.values())) if carry else k)
        else:
            keep = {}
            for name, s in scores.items():
                k = keep_count(density, s.numel())
                keep[name] = keep_top_k(s, min(k, alive[name]) if carry else k)
        self.apply_masks({name: unit_mask(kept, self.params[name].shape) for name, kept in keep.items()}, sparsity)
        if t == self.schedule.end:
            self.check_exact(*self.unit_counts(sparsity))

    def unit_counts(self, sparsity: float) -> tuple[list[int], list[int]]:
        """(kept, target) units: per layer, or one global count."""
        alive = self.alive_units()
        sizes = {name: p.shape[0] for name, p in self.params.items()}
        if self.config.scope == "global":
            return [sum(alive.values())], [keep_count(1.0 - sparsity, sum(sizes.values()))]
        return list(alive.values()), [keep_count(1.0 - sparsity, n) for n in sizes.values()]

    def layer_targets(self) -> dict[str, float] | None:
        if self.config.scope == "global":
            return None
        return {name: 1.0 - self.target for name in self.params}

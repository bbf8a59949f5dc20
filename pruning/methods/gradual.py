"""Gradual magnitude pruning on a sparsity schedule (Zhu and Gupta style), and the base of union-mask and unit pruning.

Every prune time of the schedule (see ``pruning.schedules``: ``t`` counts optimizer steps done, ``setup`` is t = 0 and
``after_step(step)`` is t = step + 1) the method keeps the largest |W| to the schedule's sparsity, with exact counts:
per *unit* (every output row / filter keeps round(density * fan_in) weights; the reference's default), per *layer*
(round(density * numel)) or *global* (one threshold, round(density * N) in all).

``carry_mask`` (off by default, as in the reference): on, pruned weights score -inf, so masks only shrink; off, the
mask is recomputed from all weights, pruned ones scored by the value they had when pruned (the reference keeps them
frozen under its multiplicative mask; here the parameter is exactly zero, so the method stores that value), and a
weight that comes back gets that stored value, with fresh optimizer state.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pruning.masks import MaskSet
from pruning.methods.base import MethodConfig, MethodContext, SparsityMethod, register_method
from pruning.schedules import LinearConfig, Schedule, ScheduleConfig, build_schedule
from pruning.selection import global_top_k, keep_top_k, keep_top_k_per_row

WeightScope = Literal["unit", "layer", "global"]
WEIGHT_SCOPES = ("unit", "layer", "global")


def keep_count(fraction_kept: float, size: int) -> int:
    """round(density * size), the exact budget every scope uses."""
    return int(round(fraction_kept * size))


class ScheduledPruning(SparsityMethod, abc.ABC):
    """Masks changed at prune times; holds the stored values of pruned weights when they may come back.

    Subclasses say when and how far to prune (``prune_at``), picking weights with ``select_weights`` or their own
    scores; this class applies the masks through the MaskSet, keeps the stored values and checks exact targets.
    """

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.total_steps = context.total_steps
        self.stored: dict[str, torch.Tensor] | None = None
        self.target = 0.0   # sparsity of the latest prune

    # ------------------------------------------------------------ hooks
    def setup(self) -> None:
        self.masks = MaskSet(self.params)
        if self.keeps_values():
            self.stored = {name: torch.zeros_like(p) for name, p in self.params.items()}
        self.prune_at(0)

    def after_step(self, step: int) -> None:
        self.prune_at(step + 1)

    @abc.abstractmethod
    def prune_at(self, t: int) -> None:
        """Change the masks if ``t`` (optimizer steps done) is a prune time."""

    def keeps_values(self) -> bool:
        """Whether pruned weights may come back (then their values at pruning time are kept)."""
        return True

    # -------------------------------------------------------- selection
    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Live weights where kept, stored values where pruned (zero when nothing is stored)."""
        assert self.masks is not None
        out = {}
        for name, p in self.params.items():
            w = p.detach()
            out[name] = torch.where(self.masks[name], w, self.stored[name]) if self.stored is not None else w
        return out

    def magnitude_scores(self, carry: bool) -> dict[str, torch.Tensor]:
        """|W| (stored values for pruned weights); with ``carry`` pruned weights score -inf so they stay pruned."""
        assert self.masks is not None
        scores = {name: w.abs() for name, w in self.effective_weights().items()}
        if carry:
            scores = {name: s.masked_fill(~self.masks[name], -math.inf) for name, s in scores.items()}
        return scores

    def select_weights(self, sparsity: float, scope: WeightScope, carry: bool) -> dict[str, torch.Tensor]:
        """Masks keeping the largest magnitudes at ``sparsity``; with ``carry`` budgets never exceed what is kept."""
        assert self.masks is not None
        scores = self.magnitude_scores(carry)
        density = 1.0 - sparsity
        if scope == "global":
            total = sum(s.numel() for s in scores.values())
            k = keep_count(density, total)
            if carry:
                k = min(k, sum(int(m.sum()) for _, m in self.masks.items()))
            return global_top_k(scores, k)
        new = {}
        for name, score in scores.items():
            mask = self.masks[name]
            if scope == "layer":
                k = keep_count(density, score.numel())
                new[name] = keep_top_k(score, min(k, int(mask.sum())) if carry else k)
            else:
                rows = score.reshape(score.shape[0], -1)
                k = torch.full((rows.shape[0],), keep_count(density, rows.shape[1]), device=score.device)
                if carry:
                    k = torch.minimum(k, mask.reshape(rows.shape).sum(1))
                new[name] = keep_top_k_per_row(rows, k).reshape(score.shape)
        return new

    def weight_counts(self, sparsity: float, scope: WeightScope) -> tuple[list[int], list[int]]:
        """(kept, target) counts per group of the scope: per row, per layer, or one global count."""
        assert self.masks is not None
        density = 1.0 - sparsity
        if scope == "global":
            total = sum(m.numel() for _, m in self.masks.items())
            return [sum(int(m.sum()) for _, m in self.masks.items())], [keep_count(density, total)]
        kept: list[int] = []
        target: list[int] = []
        for _, mask in self.masks.items():
            if scope == "layer":
                kept.append(int(mask.sum()))
                target.append(keep_count(density, mask.numel()))
            else:
                rows = mask.reshape(mask.shape[0], -1)
                kept += rows.sum(1).tolist()
                target += [keep_count(density, rows.shape[1])] * rows.shape[0]
        return kept, target

    # ---------------------------------------------------------- applying
    def apply_masks(self, new: dict[str, torch.Tensor], sparsity: float) -> None:
        """Store the values of newly pruned weights, then change the masks (regrown weights get stored values)."""
        assert self.masks is not None
        if self.stored is not None:
            with torch.no_grad():
                for name, mask in new.items():
                    dropped = self.masks[name] & ~mask
                    self.stored[name] = torch.where(dropped, self.params[name].detach(), self.stored[name])
        self.masks.update(new, optimizer=self.optimizer, grow_values=self.stored)
        self.target = sparsity

    def check_exact(self, kept: list[int], target: list[int]) -> None:
        """At the end the target must hold exactly: a shortfall is a bug, not an approximation."""
        if kept != target:
            wrong = next(i for i, (a, b) in enumerate(zip(kept, target)) if a != b)
            raise RuntimeError(f"{self.name} missed its final target: group {wrong} keeps {kept[wrong]} weights, "
                               f"the target is {target[wrong]} (sparsity {self.target})")

    # ------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, float]:
        return {"target_sparsity": self.target}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["stored"] = {n: v.cpu() for n, v in self.stored.items()} if self.stored is not None else None
        state["target"] = self.target
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        stored = state.get("stored")
        self.stored = ({n: v.to(self.params[n].device, self.params[n].dtype) for n, v in stored.items()}
                       if stored is not None else None)
        self.target = float(state.get("target", 0.0))


@dataclass
class OnScheduleConfig(MethodConfig):
    """schedule: sparsity over time; carry_mask: pruned weights stay pruned (see module)."""

    schedule: ScheduleConfig = field(default_factory=LinearConfig)
    carry_mask: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, ScheduleConfig):
            raise ValueError(f"schedule must be a schedule config (e.g. name: linear), got {self.schedule!r}")


class OnSchedule(ScheduledPruning):
    """A method that prunes at the prune times of one schedule from its config."""

    config: OnScheduleConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.schedule: Schedule = build_schedule(self.config.schedule, self.total_steps)

    def keeps_values(self) -> bool:
        return not self.config.carry_mask


@dataclass
class GradualConfig(OnScheduleConfig):
    """scope: unit (every row/filter alike), layer or global."""

    scope: WeightScope = "unit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in WEIGHT_SCOPES:
            raise ValueError(f"scope must be one of {', '.join(WEIGHT_SCOPES)}, got {self.scope!r}")


@register_method("gradual")
class GradualMagnitude(OnSchedule):
    """Gradual magnitude pruning: keep the largest |W| at every prune time of the schedule."""

    Config = GradualConfig
    config: GradualConfig

    def prune_at(self, t: int) -> None:
        if not self.schedule.is_prune_step(t):
            return
        cfg = self.config
        sparsity = self.schedule.sparsity(t)
        self.apply_masks(self.select_weights(sparsity, cfg.scope, cfg.carry_mask), sparsity)
        if t == self.schedule.end:
            self.check_exact(*self.weight_counts(sparsity, cfg.scope))

    def layer_targets(self) -> dict[str, float] | None:
        if self.config.scope == "global":
            return None
        return {name: 1.0 - self.target for name in self.params}

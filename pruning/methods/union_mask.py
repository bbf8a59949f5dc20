"""Union Mask: cyclical magnitude pruning whose cycles' masks are OR-ed into one union before a last linear ramp.

Between ``start`` and ``end`` the cycles have length C, given either as ALGORITHMS.md writes it (``cycle``: C in steps
or as a fraction of training; end - start must then hold a whole number of cycles) or as a count (``cycles``: C =
(end - start) / cycles, boundaries rounded to whole steps, so a fraction-of-training config fits any run length). In every cycle but the last, the sparsity
follows the half-cycle ramp s_f sin(pi/2 * phase / C), reaching s_f exactly on the cycle's last step (the boundary
belongs to the cycle it ends); there the mask is OR-ed into the union U and reset to all ones, and the pruned weights
come back with the values they had when pruned (stored; fresh optimizer state). At ``end - C`` the mask becomes U
instead, and the last cycle ramps linearly, with carry_mask on (masks only shrink), from the largest per-layer sparsity
of U (capped at s_f: per-unit rounding can overshoot it) to s_f at ``end``, pruning at that cycle's first step too.

Defaults keep shortcuts and the classifier dense, as the Union Mask experiments do.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pruning.methods.base import MethodConfig, MethodContext, register_method
from pruning.methods.gradual import WEIGHT_SCOPES, ScheduledPruning, WeightScope
from pruning.schedules import Linear, LinearConfig, Time, check_time, to_steps
from pruning.targets import TargetConfig


@dataclass
class UnionMaskConfig(MethodConfig):
    """final_sparsity at ``end``; cycle length ``cycle`` or a number of ``cycles`` (default 10) from start to end;
    start / end / cycle / prune_freq: steps or fractions of training."""

    targets: TargetConfig = field(default_factory=lambda: TargetConfig(exclude_roles=["shortcut", "classifier"]))
    final_sparsity: float = 0.9
    start: Time = 0
    end: Time = 0.5
    cycle: Time | None = None   # C, as ALGORITHMS.md writes it
    cycles: int | None = None   # or the number of cycles, the last one included (10 when neither is given)
    prune_freq: Time = 100
    scope: WeightScope = "unit"
    carry_mask: bool = False    # within the cycles before the last; the last cycle always carries the mask

    def __post_init__(self) -> None:
        if not 0.0 < self.final_sparsity < 1.0:
            raise ValueError(f"final_sparsity must be in (0, 1) (the fraction of weights pruned), "
                             f"got {self.final_sparsity}")
        check_time("start", self.start, zero_ok=True)
        check_time("end", self.end, zero_ok=False)
        if self.cycle is not None and self.cycles is not None:
            raise ValueError("cycles and cycle both set; give the cycle length C (cycle) or the number of cycles")
        if self.cycle is not None:
            check_time("cycle", self.cycle, zero_ok=False)
        if self.cycles is not None and self.cycles < 2:
            raise ValueError(f"cycles must be at least 2 (cycles that collect the union, then the last ramp), "
                             f"got {self.cycles}")
        check_time("prune_freq", self.prune_freq, zero_ok=False)
        if self.scope not in WEIGHT_SCOPES:
            raise ValueError(f"scope must be one of {', '.join(WEIGHT_SCOPES)}, got {self.scope!r}")


@register_method("union_mask")
class UnionMask(ScheduledPruning):
    """Cycles of prune-and-reset collecting a union mask, then one last ramp from that union to the target."""

    Config = UnionMaskConfig
    config: UnionMaskConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        cfg, total = self.config, self.total_steps
        self.start, self.end = to_steps(cfg.start, total), to_steps(cfg.end, total)
        self.freq = max(1, to_steps(cfg.prune_freq, total))
        if self.end > total:
            raise ValueError(f"end ({self.end} steps) is after the run's last step ({total}); the final sparsity "
                             "would never be reached")
        span = self.end - self.start
        if cfg.cycle is not None:
            length = to_steps(cfg.cycle, total)
            if length < 1 or span % length or span // length < 2:
                raise ValueError(f"cycle: end - start ({span} steps) must hold a whole number (at least 2) of cycles "
                                 f"of {length} steps; change cycle, start or end")
            count = span // length
        else:
            count = cfg.cycles if cfg.cycles is not None else 10
        if span < count:
            raise ValueError(f"cycles: {count} cycles do not fit between start ({self.start}) and end "
                             f"({self.end}) steps; use fewer cycles or a longer window")
        self.bounds = [self.start + round(k * span / count) for k in range(count + 1)]
        self.last_start = self.bounds[-2]
        self.union: dict[str, torch.Tensor] = {}
        self.union_sparsity: float | None = None   # largest per-layer sparsity of U, set at end - C

    def last_ramp(self) -> Linear:
        """The last cycle's linear ramp, from the union's largest per-layer sparsity to s_f."""
        assert self.union_sparsity is not None
        return Linear(LinearConfig(final_sparsity=self.config.final_sparsity, initial_sparsity=self.union_sparsity,
                                   start=self.last_start, end=self.end, prune_freq=self.freq), self.total_steps)

    def _cycle(self, t: int) -> int:
        """Index k of the cycle (bounds[k], bounds[k + 1]] holding ``t`` (t > start)."""
        return bisect.bisect_left(self.bounds, t) - 1

    def is_cycle_prune(self, t: int) -> bool:
        """Prune times before the last cycle: every prune_freq steps from each cycle's start, and every boundary."""
        if not self.start <= t <= self.last_start:
            return False
        return t == self.start or t in self.bounds or (t - self.bounds[self._cycle(t)]) % self.freq == 0

    def cycle_sparsity(self, t: int) -> float:
        """Half-cycle ramp: s_f sin(pi/2 * phase / C), phase in (0, C] within the cycle, 0 at ``start``."""
        if t <= self.start:
            return 0.0
        k = self._cycle(t)
        phase = (t - self.bounds[k]) / (self.bounds[k + 1] - self.bounds[k])
        return self.config.final_sparsity * math.sin(math.pi / 2 * phase)

    def prune_at(self, t: int) -> None:
        cfg = self.config
        if self.is_cycle_prune(t):
            sparsity = self.cycle_sparsity(t)
            self.apply_masks(self.select_weights(sparsity, cfg.scope, cfg.carry_mask), sparsity)
            if t > self.start and t in self.bounds:
                self._end_cycle(last=t == self.last_start)
        if self.last_start <= t <= self.end and self.union_sparsity is not None:
            ramp = self.last_ramp()
            if ramp.is_prune_step(t):
                sparsity = ramp.sparsity(t)
                self.apply_masks(self.select_weights(sparsity, cfg.scope, carry=True), sparsity)
                if t == self.end:
                    self.check_exact(*self.weight_counts(sparsity, cfg.scope))

    def _end_cycle(self, last: bool) -> None:
        """OR the mask into U; reset to all ones, or, before the last cycle, to U itself."""
        assert self.masks is not None
        for name, mask in self.masks.items():
            self.union[name] = self.union[name] | mask if name in self.union else mask.clone()
        if last:
            self.masks.update({n: u.clone() for n, u in self.union.items()}, optimizer=self.optimizer,
                              grow_values=self.stored)
            largest = max(1.0 - float(u.sum()) / u.numel() for u in self.union.values())
            self.union_sparsity = min(largest, self.config.final_sparsity)   # per-unit rounding can overshoot
            self.target = 1.0 - self.masks.density()
        else:
            self.masks.update({n: torch.ones_like(m) for n, m in self.masks.items()}, optimizer=self.optimizer,
                              grow_values=self.stored)
            self.target = 0.0

    def layer_targets(self) -> dict[str, float] | None:
        if self.config.scope == "global":
            return None
        return {name: 1.0 - self.target for name in self.params}

    def metrics(self) -> dict[str, float]:
        values = super().metrics()
        if self.union_sparsity is not None:
            values["union_max_layer_sparsity"] = self.union_sparsity
        return values

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["union"] = {n: u.cpu() for n, u in self.union.items()}
        state["union_sparsity"] = self.union_sparsity
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.union = {n: u.to(self.params[n].device, torch.bool) for n, u in state.get("union", {}).items()}
        saved = state.get("union_sparsity")
        self.union_sparsity = float(saved) if saved is not None else None

"""Union Mask: cyclical magnitude pruning whose cycles' masks are OR-ed into one union before a last linear ramp.

Between ``start`` and ``end`` the cycles have length C, given either as ALGORITHMS.md writes it (``cycle``: C in steps
or as a fraction of training; end - start must then hold a whole number of cycles) or as a count (``cycles``: C =
(end - start) / cycles, boundaries rounded to whole steps, so a fraction-of-training config fits any run length);
``pruning.timing.UnionCycles`` holds that arithmetic. In every cycle but the last, the sparsity follows the half-cycle
ramp s_f sin(pi/2 * phase / C), reaching s_f exactly on the cycle's last step (the boundary
belongs to the cycle it ends); there the mask is OR-ed into the union U and reset to all ones, and the pruned weights
come back with the values they had when pruned (stored; fresh optimizer state). At ``end - C`` the mask becomes U
instead, and the last cycle ramps linearly, with carry_mask on (masks only shrink), from the largest per-layer sparsity
of U (capped at s_f: per-unit rounding can overshoot it) to s_f at ``end``, pruning at that cycle's first step too.

Defaults keep shortcuts and the classifier dense, as the Union Mask experiments do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from pruning.methods.base import MethodConfig, MethodContext, register_method
from pruning.methods.gradual import WEIGHT_SCOPES, ScheduledPruning, WeightScope
from pruning.schedules import Linear, Time, check_time
from pruning.targets import TargetConfig
from pruning.timing import UnionCycles


@dataclass
class UnionMaskConfig(MethodConfig):
    """density: the fraction of weights kept at ``end`` (s_f = 1 - density); cycle length ``cycle`` or a number of
    ``cycles`` (default 10) from start to end; start / end / cycle / prune_freq: steps or fractions of training."""

    renamed: ClassVar[dict[str, str]] = {
        "final_sparsity": "use sparsity.density=<1 - final_sparsity> (the fraction kept, as in every method)"}
    targets: TargetConfig = field(default_factory=lambda: TargetConfig(exclude_roles=["shortcut", "classifier"]))
    density: float = 0.1
    start: Time = 0   # when the first cycle starts
    end: Time = 0.5   # when the last ramp reaches the density
    cycle: Time | None = None   # C, as the method specification writes it
    cycles: int | None = None   # or the number of cycles, the last one included (10 when neither is given)
    prune_freq: Time = 100   # steps (or fraction) between prunes
    scope: WeightScope = "unit"   # unit (every row/filter alike), layer or global
    carry_mask: bool = False    # within the cycles before the last; the last cycle always carries the mask

    def __post_init__(self) -> None:
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density must be in (0, 1) (the fraction of weights kept at the end), got {self.density}")
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

    def check_length(self, steps_per_epoch: int, epochs: int) -> list[str]:
        """The cycles and the last ramp must fit the run (``UnionCycles`` says why not)."""
        total = max(1, steps_per_epoch * epochs)
        try:
            UnionCycles(1.0 - self.density, self.start, self.end, self.cycle, self.cycles, self.prune_freq, total)
        except ValueError as error:
            raise ValueError(f"sparsity.{error} (a run of {steps_per_epoch} steps per epoch x {epochs} epochs)") \
                from None
        return []


@register_method("union_mask")
class UnionMask(ScheduledPruning):
    """Cycles of prune-and-reset collecting a union mask, then one last ramp from that union to the target."""

    Config = UnionMaskConfig
    config: UnionMaskConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        cfg = self.config
        self.cycles = UnionCycles(1.0 - cfg.density, cfg.start, cfg.end, cfg.cycle, cfg.cycles, cfg.prune_freq,
                                  self.total_steps)
        self.union: dict[str, torch.Tensor] = {}
        self.union_sparsity: float | None = None   # largest per-layer sparsity of U, set at end - C

    def last_ramp(self) -> Linear:
        """The last cycle's linear ramp, from the union's largest per-layer sparsity to s_f."""
        assert self.union_sparsity is not None
        return self.cycles.last_ramp(self.union_sparsity)

    def prune_at(self, t: int) -> None:
        cycles = self.cycles
        if cycles.is_prune_step(t):
            self.prune(cycles.sparsity(t), self.config.carry_mask)
            if cycles.is_boundary(t):
                self._end_cycle(last=t == cycles.last_start)
        if cycles.last_start <= t <= cycles.end and self.union_sparsity is not None:
            ramp = self.last_ramp()
            if ramp.is_prune_step(t):
                sparsity = ramp.sparsity(t)
                self.prune(sparsity, carry=True)
                if t == cycles.end:
                    self.check_budget(self.scope, 1.0 - sparsity)

    def _end_cycle(self, last: bool) -> None:
        """OR the mask into U; reset to all ones, or, before the last cycle, to U itself."""
        for name, mask in self.masks.items():
            self.union[name] = self.union[name] | mask if name in self.union else mask.clone()
        if last:
            self.masks.update({n: u.clone() for n, u in self.union.items()}, optimizer=self.optimizer,
                              grow_values=self.stored)
            largest = max(1.0 - float(u.sum()) / u.numel() for u in self.union.values())
            self.union_sparsity = min(largest, self.cycles.final)   # per-unit rounding can overshoot
            self.target = 1.0 - self.masks.density()
        else:
            self.masks.update({n: torch.ones_like(m) for n, m in self.masks.items()}, optimizer=self.optimizer,
                              grow_values=self.stored)
            self.target = 0.0

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

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
from typing import Any, ClassVar, Literal

import torch

from pruning.methods.at_init import check_nm_layers
from pruning.methods.base import MaskedMethod, MethodConfig, MethodContext, register_method
from pruning.schedules import LinearConfig, Schedule, ScheduleConfig, build_schedule
from pruning.scopes import NMScope, Scope, build_scope, parse_nm, shapes_of

WeightScope = Literal["unit", "layer", "global"]
WEIGHT_SCOPES = {"unit": "row", "layer": "layer", "global": "global"}   # config word -> registered scope


class ScheduledPruning(MaskedMethod, abc.ABC):
    """Masks changed at prune times by magnitude; holds the stored values of pruned weights when they may come back.

    Subclasses say when and how far to prune (``prune_at``); the scope named by the config's ``scope`` (through
    ``scope_names``) turns magnitudes into masks with exact budgets and checks them; this class applies the masks
    through the MaskSet and keeps the stored values.
    """

    scope_names: ClassVar[dict[str, str]] = WEIGHT_SCOPES

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.total_steps = context.total_steps
        word = getattr(self.config, "scope")   # every scheduled method's config names its scope
        self.scope: Scope = build_scope(self.scope_names[word], shapes_of(self.params),
                                        nm=getattr(self.config, "nm", None))
        self.stored: dict[str, torch.Tensor] | None = None
        self.target = 0.0   # sparsity of the latest prune

    # ------------------------------------------------------------ hooks
    def setup(self) -> None:
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
        out = {}
        for name, p in self.params.items():
            w = p.detach()
            out[name] = torch.where(self.masks[name], w, self.stored[name]) if self.stored is not None else w
        return out

    def prune(self, sparsity: float, carry: bool, target: float | None = None) -> None:
        """Keep the largest |W| (stored values for pruned weights) at ``sparsity`` with the scope's exact budgets;
        with ``carry`` pruned weights score -inf and budgets never exceed what is kept, so masks only shrink.
        ``target``: the sparsity to report, when it is not ``sparsity`` itself."""
        scores = {name: w.abs() for name, w in self.effective_weights().items()}
        kept = dict(self.masks.items()) if carry else None
        self.apply_masks(self.scope.select(scores, 1.0 - sparsity, kept), sparsity if target is None else target)

    # ---------------------------------------------------------- applying
    def apply_masks(self, new: dict[str, torch.Tensor], sparsity: float) -> None:
        """Store the values of newly pruned weights, then change the masks (regrown weights get stored values)."""
        if self.stored is not None:
            with torch.no_grad():
                for name, mask in new.items():
                    dropped = self.masks[name] & ~mask
                    self.stored[name] = torch.where(dropped, self.params[name].detach(), self.stored[name])
        self.masks.update(new, optimizer=self.optimizer, grow_values=self.stored)
        self.target = sparsity

    # ------------------------------------------------------------ reporting
    def layer_targets(self) -> dict[str, float] | None:
        return self.scope.targets(1.0 - self.target)

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

    def check_length(self, steps_per_epoch: int, epochs: int) -> list[str]:
        """The schedule must reach its final sparsity within the run (its window in steps fits the run)."""
        try:
            build_schedule(self.schedule, max(1, steps_per_epoch * epochs))
        except ValueError as error:
            raise ValueError(f"sparsity.schedule: {error}; with {steps_per_epoch} steps per epoch x {epochs} epochs, "
                             "give start and end as fractions of training (floats) or train longer") from None
        return []


class OnSchedule(ScheduledPruning):
    """A method that prunes at the prune times of one schedule from its config."""

    config: OnScheduleConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.schedule: Schedule = build_schedule(self.config.schedule, self.total_steps)

    def keeps_values(self) -> bool:
        return not self.config.carry_mask

    def prune_at(self, t: int) -> None:
        """At the schedule's prune times: prune to its sparsity; at ``end`` the budgets must hold exactly."""
        if not self.schedule.is_prune_step(t):
            return
        sparsity = self.schedule.sparsity(t)
        self.prune(sparsity, self.config.carry_mask)
        if t == self.schedule.end:
            self.check_budget(self.scope, 1.0 - sparsity)
            if isinstance(self.scope, NMScope):   # from here on every update must keep the N:M pattern exactly
                self.masks.pattern_check = self.scope.check_pattern


@dataclass
class GradualConfig(OnScheduleConfig):
    """scope: unit (every row/filter alike), layer or global; nm: [N, M] in place of the scope: every prune time
    keeps round(d_t * M) of every M consecutive weights of a row's fan-in (d_t = 1 - the schedule's sparsity, so the
    groups go M:M, (M-1):M, ... as it rises) and the final prune N:M exactly; final_sparsity must be 1 - N / M."""

    scope: WeightScope = "unit"
    nm: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in WEIGHT_SCOPES:
            raise ValueError(f"scope must be one of {', '.join(WEIGHT_SCOPES)}, got {self.scope!r}")
        if self.nm is not None:
            self.nm = list(parse_nm(self.nm, "sparsity.nm"))
            n, m = self.nm
            if not math.isclose(self.schedule.final_sparsity, 1.0 - n / m, abs_tol=1e-9):
                raise ValueError(f"sparsity.nm [{n}, {m}] ends with {n} of every {m} weights kept; set sparsity."
                                 f"schedule.final_sparsity={1.0 - n / m:g} (got {self.schedule.final_sparsity:g})")


@register_method("gradual")
class GradualMagnitude(OnSchedule):
    """Gradual magnitude pruning: keep the largest |W| at every prune time of the schedule."""

    Config = GradualConfig
    config: GradualConfig

    @classmethod
    def check_model(cls, config: MethodConfig, model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
        """nm: refuse, before any worker starts, prunable layers whose fan-in is not a multiple of M."""
        super().check_model(config, model, input_shape)
        check_nm_layers(getattr(config, "nm", None), model, config.targets)

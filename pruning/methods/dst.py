"""Dynamic sparse training (ALGORITHMS.md section 3): the base every DST method shares, SET and RigL (DSR: ``dsr.py``).

The base builds random initial masks at ``density`` with per-layer budgets from ``distribution`` (uniform, ER, ERK)
through its scope, then, at the update times of its ``UpdatePeriods`` (every ``period`` optimizer steps, a schedule
of periods by epoch, until ``stop_epoch``), asks the subclass for new masks and applies them through
``MaskSet.update`` (which zeroes dropped weights, sets grown ones, zeroes their optimizer state and checks that every
rank agrees). Time follows the project's rule: ``after_step(step)`` is t = step + 1 steps done. Every random choice
comes from ``seeded_generator(seed, step, purpose/layer)``, so ranks agree with no communication.

A class that grows by gradient sets ``needs_dense_grads``: the base then copies the dense gradient (all-reduced,
pruned entries included) in ``before_step`` of update steps, before masking it, and passes it to the update.

Total active weights are conserved by every update (checked: a method that loses or invents weights raises).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch

from pruning.masks import MaskChange
from pruning.methods.base import MaskedMethod, MethodConfig, MethodContext, register_method
from pruning.scopes import Scope, build_scope, random_masks, shapes_of
from pruning.selection import keep_top_k, seeded_uniform
from pruning.timing import DropFraction, UpdatePeriods

GrowInit = Literal["zero", "reinit"]
Grads = Mapping[str, torch.Tensor]


@dataclass
class DSTConfig(MethodConfig):
    """density: fraction kept; distribution: initial per-layer budgets; period (steps) between updates, changed to
    ``periods[i]`` from epoch ``period_epochs[i]`` on; no update from ``stop_epoch`` on (null: never stop);
    grow_init: regrown weights start at zero or re-initialised U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    density: float = 0.1
    distribution: Literal["uniform", "er", "erk"] = "uniform"
    period: int = 100   # steps between updates (until period_epochs[0])
    period_epochs: list[int] = field(default_factory=list)   # epochs at which periods[i] takes over
    periods: list[int] = field(default_factory=list)   # steps between updates from period_epochs[i] on
    stop_epoch: int | None = None   # no update from this epoch on; null: never stop
    grow_init: GrowInit = "zero"

    def __post_init__(self) -> None:
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density must be in (0, 1) (the fraction of weights kept), got {self.density}")
        if self.period < 1:
            raise ValueError(f"period must be at least 1 step, got {self.period}")
        if len(self.period_epochs) != len(self.periods):
            raise ValueError(f"period_epochs has {len(self.period_epochs)} entries and periods {len(self.periods)}; "
                             "give one period per starting epoch")
        if any(e < 0 for e in self.period_epochs) or any(
                b <= a for a, b in zip(self.period_epochs, self.period_epochs[1:])):
            raise ValueError(f"period_epochs must be non-negative and strictly increasing, got {self.period_epochs}")
        if any(p < 1 for p in self.periods):
            raise ValueError(f"periods must all be at least 1 step, got {self.periods}")
        if self.stop_epoch is not None and self.stop_epoch < 0:
            raise ValueError(f"stop_epoch must be non-negative or null, got {self.stop_epoch}")
        if self.grow_init not in ("zero", "reinit"):
            raise ValueError(f"grow_init must be zero or reinit, got {self.grow_init!r}")
        default_period = next(f.default for f in fields(DSTConfig) if f.name == "period")
        if self.period_epochs and self.period_epochs[0] == 0 and self.period != default_period:
            raise ValueError(f"period {self.period} is never used: periods takes over from epoch 0 "
                             f"(period_epochs={self.period_epochs}); set sparsity.period_epochs=[] sparsity.periods=[] "
                             "for one constant period, or change sparsity.periods")

    def check_length(self, steps_per_epoch: int, epochs: int) -> list[str]:
        """Refuse a schedule with no update in the run; warn about a stop or a period change beyond its end."""
        times = UpdatePeriods(self.period, self.period_epochs, self.periods, self.stop_epoch, steps_per_epoch, epochs)
        total = steps_per_epoch * epochs
        if times.first_due() is None:
            run = f"{total} steps ({epochs} epochs of {steps_per_epoch})"
            if times.stop_step == 0:
                raise ValueError(f"sparsity.stop_epoch=0: {self.method} would never update its masks; set "
                                 "sparsity.stop_epoch=null (or later), or use a static method")
            if self.periods and self.period_epochs[0] == 0:
                key = f"sparsity.periods={self.periods} (from epochs {self.period_epochs})"
            else:
                key = f"sparsity.period={self.period}"
            raise ValueError(f"{key}: {self.method} would never update its masks in this run of {run}; use a "
                             f"shorter period (e.g. sparsity.period={max(1, min(steps_per_epoch, total // 10))} "
                             "sparsity.period_epochs=[] sparsity.periods=[]) or train longer")
        notes = []
        if self.stop_epoch is not None and self.stop_epoch > epochs:
            notes.append(f"sparsity.stop_epoch={self.stop_epoch} is after the run's {epochs} epochs: updates never "
                         "stop (a cosine drop fraction still decays towards that epoch)")
        end = epochs if self.stop_epoch is None else min(epochs, self.stop_epoch)
        late = [e for e in self.period_epochs if e >= end]
        if late:
            notes.append(f"sparsity.period_epochs {late} start after the last update epoch ({end - 1}): those "
                         "periods never take effect")
        return notes


class DynamicSparse(MaskedMethod, abc.ABC):
    """Random sparse start, then periodic drop-and-grow through the MaskSet; subclasses say what changes."""

    Config = DSTConfig
    config: DSTConfig
    needs_dense_grads: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        cfg = self.config
        self.scope: Scope = self.make_scope()
        self.periods = UpdatePeriods(cfg.period, cfg.period_epochs, cfg.periods, cfg.stop_epoch,
                                     context.steps_per_epoch, context.epochs)
        self.stop_step = self.periods.stop_step    # T_end: the first step with no update
        self.dense_grads: dict[str, torch.Tensor] = {}
        self.overflowed = False
        self.skipped = 0    # updates skipped because the step's gradients were not finite
        self.updates = 0
        self.last_changes: dict[str, MaskChange] = {}
        self.last_step = -1
        self.ever_active: dict[str, torch.Tensor] = {}   # per weight: active at any time so far (reporting only)

    def make_scope(self) -> Scope:
        """Per-layer budgets of single weights with the configured distribution."""
        return build_scope("layer", shapes_of(self.params), self.config.distribution)

    # ------------------------------------------------------------ hooks
    def setup(self) -> None:
        """Random units at the scope's exact per-layer budgets (seeded: the same on every rank)."""
        self.masks.update(random_masks(self.scope, self.config.density, self.context.seed), optimizer=self.optimizer)
        self.ever_active = {}
        self.mark_active()

    def before_step(self, step: int) -> None:
        """On update steps of a class that grows by gradient, copy the dense gradient before it is masked."""
        if self.needs_dense_grads and self.periods.is_due(step + 1):
            self.dense_grads = self.masks.access.dense_grads(self.params)
            finite = torch.stack([torch.isfinite(g).all() for g in self.dense_grads.values()]).all()
            self.overflowed = not bool(finite)   # fp16: the loss scaler skips this step; the update waits
        super().before_step(step)

    def after_step(self, step: int) -> None:
        if not self.periods.is_due(step + 1):
            return
        grads, self.dense_grads = self.dense_grads, {}
        if self.needs_dense_grads and not grads:
            raise RuntimeError(f"{self.name} has no dense gradient for the update after step {step}; before_step "
                               "must run on every update step")
        if self.needs_dense_grads and self.overflowed:
            # the gradients overflowed (fp16 loss scaling skips this optimizer step): no scores to grow by, so this
            # update is skipped on every rank alike (the gradients are all-reduced) and the next period updates
            self.skipped += 1
            self.record(step + 1, {"dst/skipped_updates": float(self.skipped)})
            return
        before = self.active_count()
        with torch.no_grad():
            new = self.new_masks(step, grads)
        self.last_changes = self.masks.update(new, optimizer=self.optimizer, grow_values=self.grow_values(step))
        self.check_conserved(before)
        self.mark_active()
        self.updates += 1
        self.last_step = step
        event = self.metrics()      # per update: churn, DSR's threshold and reallocation, and per-layer density
        event.update({f"dst/density/{name}": int(m.sum()) / m.numel() for name, m in self.masks.items()})
        self.record(step + 1, event)

    @abc.abstractmethod
    def new_masks(self, step: int, grads: Grads) -> dict[str, torch.Tensor]:
        """The masks after this update (every layer); the active count must be conserved. ``grads``: the dense
        gradients when the class ``needs_dense_grads``, else empty."""

    # ------------------------------------------------------------ helpers
    def random_scores(self, step: int, purpose: str, name: str) -> torch.Tensor:
        """U(0, 1) scores shaped like the layer, from the (seed, step, purpose/name) stream."""
        return seeded_uniform(self.params[name], self.context.seed, step, f"{purpose}/{name}")

    def grow_values(self, step: int) -> dict[str, torch.Tensor] | None:
        """Values of regrown weights: None (zero) or a seeded re-initialisation at torch's default scale."""
        if self.config.grow_init == "zero":
            return None
        values = {}
        for name, param in self.params.items():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            bound = 1.0 / math.sqrt(fan_in)
            values[name] = (self.random_scores(step, "reinit", name) * 2.0 - 1.0) * bound
        return values

    def active_count(self) -> int:
        """What an update conserves: active units of the scope (weights; DSR with kernel granularity: slices)."""
        return sum(self.scope.kept_units(dict(self.masks.items())).values())

    def check_conserved(self, before: int) -> None:
        """Raise if the update changed the active count (a bug in the method, never rounding)."""
        after = self.active_count()
        if after != before:
            raise RuntimeError(f"{self.name} changed the active count from {before} to {after}; "
                               "drop-and-grow must conserve it")

    # ------------------------------------------------------------ reporting
    def mark_active(self) -> None:
        """OR the current masks into the ever-active masks (created from the current masks the first time)."""
        for name, mask in self.masks.items():
            seen = self.ever_active.get(name)
            self.ever_active[name] = mask.clone() if seen is None else seen.logical_or_(mask)

    def ever_active_fraction(self) -> dict[str, float]:
        """Per layer, the fraction of its weights active at some time of the run so far (how far the method
        explored beyond its initial mask)."""
        if not self.ever_active:
            self.mark_active()
        return {name: int(seen.count_nonzero()) / seen.numel() for name, seen in self.ever_active.items()}

    def layer_targets(self) -> dict[str, float] | None:
        return self.scope.targets(self.config.density)

    def metrics(self) -> dict[str, float]:
        """The latest update's churn (the trainer logs these at epoch ends, next to per-layer density)."""
        out: dict[str, float] = {"dst/updates": float(self.updates), "dst/last_update_step": float(self.last_step)}
        for name, change in self.last_changes.items():
            out[f"dst/dropped/{name}"] = float(change.dropped)
            out[f"dst/grown/{name}"] = float(change.grown)
        return out   # per-layer density: the trainer logs it for every method as sparsity/layer/<name>

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["updates"] = self.updates
        state["last_step"] = self.last_step
        state["skipped"] = self.skipped
        state["ever_active"] = {name: seen.cpu() for name, seen in self.ever_active.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.updates = int(state.get("updates", 0))
        self.last_step = int(state.get("last_step", -1))
        self.skipped = int(state.get("skipped", 0))
        # a checkpoint from before ever-active tracking starts it from the restored masks
        self.ever_active = {name: seen.to(device=self.masks[name].device, dtype=torch.bool).clone()
                            for name, seen in (state.get("ever_active") or {}).items() if name in self.masks}
        self.mark_active()


# ---------------------------------------------------------------------------------------------------- SET / RigL
@dataclass
class SETConfig(DSTConfig):
    """drop_fraction f: each update drops int(f_t * active) + 1 per layer; f_t = f (constant) or, with
    drop_decay cosine, f / 2 (1 + cos(pi t / T_end)), T_end = the first step of stop_epoch (or the run's end).
    Typical f for WRN-28-2 at 90% sparsity: 0.138 (the DSR paper's SET baseline); RigL's paper uses 0.3, cosine."""

    drop_fraction: float = 0.3
    drop_decay: Literal["constant", "cosine"] = "constant"   # f_t: constant f, or cosine decay to 0 at T_end

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in (0, 1), got {self.drop_fraction}")
        if self.drop_decay not in ("constant", "cosine"):
            raise ValueError(f"drop_decay must be constant or cosine, got {self.drop_decay!r}")


@register_method("set")
class SET(DynamicSparse):
    """Sparse Evolutionary Training: per layer, drop the int(f_t * active) + 1 smallest |w| and regrow as many.

    Grow candidates are all positions inactive after the drop, the just-dropped ones included (as RigL's reference
    does). A weight dropped and regrown in the same update is simply kept: its value and optimizer state are left
    alone, and it counts as neither dropped nor grown. Newly grown weights start at ``grow_init`` (zero by default)
    with zero optimizer state. Per-layer active counts are conserved exactly.
    """

    Config = SETConfig
    config: SETConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.drop_fraction = DropFraction(self.config.drop_fraction, self.config.drop_decay, self.stop_step)

    def grow_scores(self, step: int, name: str, grads: Grads) -> torch.Tensor:
        """Higher = grown first. SET: uniform random from the (seed, step, grow/name) stream."""
        return self.random_scores(step, "grow", name)

    def new_masks(self, step: int, grads: Grads) -> dict[str, torch.Tensor]:
        fraction = self.drop_fraction.at(step + 1)
        new = {}
        for name, param in self.params.items():
            mask = self.masks[name]
            active = int(mask.sum())
            n = min(active, int(fraction * active) + 1)
            magnitude = param.detach().abs().masked_fill(~mask, -math.inf)
            kept = keep_top_k(magnitude, active - n)               # ties: the lowest index survives
            scores = self.grow_scores(step, name, grads).to(magnitude.dtype).masked_fill(kept, -math.inf)
            new[name] = kept | keep_top_k(scores, n)
        return new


@dataclass
class RigLConfig(SETConfig):
    """SET's settings; the drop fraction decays by cosine by default, as in the RigL paper."""

    drop_decay: Literal["constant", "cosine"] = "cosine"


@register_method("rigl")
class RigL(SET):
    """RigL: SET's drop, but grow where |dense gradient| is largest among inactive positions (the gradient of this
    step, reduced over ranks, read through the MaskSet's access: ``param.grad`` under DDP, every rank's slices of
    DeepSpeed's partitioned buffers under ZeRO 1 and 2)."""

    Config = RigLConfig
    needs_dense_grads = True

    def grow_scores(self, step: int, name: str, grads: Grads) -> torch.Tensor:
        return grads[name].abs()

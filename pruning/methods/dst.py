"""Dynamic sparse training (ALGORITHMS.md section 3): SET, RigL and DSR on one base.

The base builds random initial masks at ``density`` with per-layer budgets from ``distribution`` (uniform, ER, ERK),
then, every ``period`` optimizer steps until ``stop_epoch``, asks the subclass for new masks and applies them through
``MaskSet.update`` (which zeroes dropped weights, sets grown ones, zeroes their optimizer state and checks that every
rank agrees). Time follows the project's rule: ``after_step(step)`` is t = step + 1 steps done, and an update runs
when t is a multiple of the period in force at the epoch of ``step``. Every random choice comes from
``seeded_generator(seed, step, purpose/layer)``, so ranks agree with no communication.

Total active weights are conserved by every update (checked: a method that loses or invents weights raises).
"""

from __future__ import annotations

import abc
import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pruning.agreement import seeded_generator
from pruning.masks import MaskChange, MaskSet
from pruning.methods.base import MethodConfig, MethodContext, SparsityMethod, register_method
from pruning.selection import apportion, global_top_k, keep_top_k, layer_counts, layer_densities
from pruning.targets import TargetConfig

GrowInit = Literal["zero", "reinit"]


@dataclass
class DSTConfig(MethodConfig):
    """density: fraction kept; distribution: initial per-layer budgets; period (steps) between updates, changed to
    ``periods[i]`` from epoch ``period_epochs[i]`` on; no update from ``stop_epoch`` on (null: never stop);
    grow_init: regrown weights start at zero or re-initialised U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    density: float = 0.1
    distribution: Literal["uniform", "er", "erk"] = "uniform"
    period: int = 100
    period_epochs: list[int] = field(default_factory=list)
    periods: list[int] = field(default_factory=list)
    stop_epoch: int | None = None
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


def seeded_uniform(param: torch.Tensor, seed: int, step: int, purpose: str) -> torch.Tensor:
    """U(0, 1) values shaped like ``param`` (on its device) from the (seed, step, purpose) stream: rank-independent."""
    return torch.rand(param.shape, generator=seeded_generator(seed, step, purpose)).to(param.device)


def distribution_densities(params: dict[str, torch.nn.Parameter], density: float,
                           distribution: str) -> dict[str, float]:
    """Each layer's density under the distribution (uniform, ER, ERK) at the global ``density``."""
    return layer_densities({name: p.shape for name, p in params.items()}, density, distribution)


def random_masks(params: dict[str, torch.nn.Parameter], density: float, distribution: str,
                 seed: int) -> dict[str, torch.Tensor]:
    """Random masks with the distribution's exact per-layer counts, the same on every rank."""
    counts = layer_counts({name: p.shape for name, p in params.items()}, density, distribution)
    return {name: keep_top_k(seeded_uniform(p, seed, 0, f"init/{name}"), counts[name]) for name, p in params.items()}


def stop_step(stop_epoch: int | None, context: MethodContext) -> int:
    """The first step with no mask update: the start of ``stop_epoch``, or the end of the run when it is null."""
    return (stop_epoch if stop_epoch is not None else context.epochs) * max(1, context.steps_per_epoch)


class DynamicSparse(SparsityMethod, abc.ABC):
    """Random sparse start, then periodic drop-and-grow through the MaskSet; subclasses say what changes."""

    Config = DSTConfig
    config: DSTConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.steps_per_epoch = max(1, context.steps_per_epoch)
        self.stop_step = stop_step(self.config.stop_epoch, context)    # T_end: the first step with no update
        self.updates = 0
        self.last_changes: dict[str, MaskChange] = {}
        self.last_step = -1

    # ------------------------------------------------------------ schedule
    def period_at(self, epoch: int) -> int:
        """The period in force at ``epoch``: ``period`` until the first of ``period_epochs``, then its ``periods``."""
        i = bisect.bisect_right(self.config.period_epochs, epoch) - 1
        return self.config.periods[i] if i >= 0 else self.config.period

    def is_update_step(self, step: int) -> bool:
        """Whether ``after_step(step)`` changes the masks."""
        if step >= self.stop_step:
            return False
        return (step + 1) % self.period_at(step // self.steps_per_epoch) == 0

    # ------------------------------------------------------------ hooks
    def setup(self) -> None:
        """Random masks with the distribution's exact per-layer counts (seeded: the same on every rank)."""
        self.masks = MaskSet(self.params)
        self.masks.update(random_masks(self.params, self.config.density, self.config.distribution, self.context.seed),
                          optimizer=self.optimizer)

    def after_step(self, step: int) -> None:
        if not self.is_update_step(step):
            return
        assert self.masks is not None, "setup() or load_state_dict() first"
        before = self.active_count()
        with torch.no_grad():
            new = self.new_masks(step)
        grow = self.grow_values(step)
        self.last_changes = self.masks.update(new, optimizer=self.optimizer, grow_values=grow)
        self.check_conserved(before)
        self.updates += 1
        self.last_step = step
        event = self.metrics()      # per update: churn, DSR's threshold and reallocation, and per-layer density
        event.update({f"dst/density/{name}": int(m.sum()) / m.numel() for name, m in self.masks.items()})
        self.record(step + 1, event)

    @abc.abstractmethod
    def new_masks(self, step: int) -> dict[str, torch.Tensor]:
        """The masks after this update (every layer); the active count must be conserved."""

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
        """What an update conserves: active weights (DSR with kernel granularity: active kernel slices)."""
        assert self.masks is not None
        return sum(int(m.sum()) for _, m in self.masks.items())

    def check_conserved(self, before: int) -> None:
        """Raise if the update changed the active count (a bug in the method, never rounding)."""
        after = self.active_count()
        if after != before:
            raise RuntimeError(f"{self.name} changed the active count from {before} to {after}; "
                               "drop-and-grow must conserve it")

    # ------------------------------------------------------------ reporting
    def layer_targets(self) -> dict[str, float] | None:
        return distribution_densities(self.params, self.config.density, self.config.distribution)

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
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.updates = int(state.get("updates", 0))
        self.last_step = int(state.get("last_step", -1))


# ---------------------------------------------------------------------------------------------------- SET / RigL
@dataclass
class SETConfig(DSTConfig):
    """drop_fraction f: each update drops int(f_t * active) + 1 per layer; f_t = f (constant) or, with
    drop_decay cosine, f / 2 (1 + cos(pi t / T_end)), T_end = the first step of stop_epoch (or the run's end).
    Typical f for WRN-28-2 at 90% sparsity: 0.138 (the DSR paper's SET baseline); RigL's paper uses 0.3, cosine."""

    drop_fraction: float = 0.3
    drop_decay: Literal["constant", "cosine"] = "constant"

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

    def drop_fraction(self, step: int) -> float:
        """f_t at t = step + 1 steps done."""
        f = self.config.drop_fraction
        if self.config.drop_decay == "constant":
            return f
        return f / 2.0 * (1.0 + math.cos(math.pi * min(step + 1, self.stop_step) / max(1, self.stop_step)))

    def grow_scores(self, step: int, name: str) -> torch.Tensor:
        """Higher = grown first. SET: uniform random from the (seed, step, grow/name) stream."""
        return self.random_scores(step, "grow", name)

    def new_masks(self, step: int) -> dict[str, torch.Tensor]:
        assert self.masks is not None
        fraction = self.drop_fraction(step)
        new = {}
        for name, param in self.params.items():
            mask = self.masks[name]
            active = int(mask.sum())
            n = min(active, int(fraction * active) + 1)
            magnitude = param.detach().abs().masked_fill(~mask, -math.inf)
            kept = keep_top_k(magnitude, active - n)               # ties: the lowest index survives
            scores = self.grow_scores(step, name).to(magnitude.dtype).masked_fill(kept, -math.inf)
            new[name] = kept | keep_top_k(scores, n)
        return new


@dataclass
class RigLConfig(SETConfig):
    """SET's settings; the drop fraction decays by cosine by default, as in the RigL paper."""

    drop_decay: Literal["constant", "cosine"] = "cosine"


@register_method("rigl")
class RigL(SET):
    """RigL: SET's drop, but grow where |dense gradient| is largest among inactive positions.

    The dense gradient is the one of this step, already reduced over ranks, read in ``before_step`` of update steps
    before the pruned entries are masked, through the MaskSet's access: ``param.grad`` under DDP, every rank's
    slices of DeepSpeed's partitioned buffers (gathered by one all-reduce) under ZeRO 1 and 2.
    """

    Config = RigLConfig
    config: RigLConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.dense_grads: dict[str, torch.Tensor] = {}

    def before_step(self, step: int) -> None:
        if self.is_update_step(step):
            assert self.masks is not None, "setup() or load_state_dict() first"
            self.dense_grads = {name: grad.abs_() for name, grad in self.masks.access.dense_grads(self.params).items()}
        super().before_step(step)

    def grow_scores(self, step: int, name: str) -> torch.Tensor:
        if name not in self.dense_grads:
            raise RuntimeError(f"rigl has no gradient of {name} for the update after step {step}; before_step must "
                               "run on every update step")
        return self.dense_grads[name]

    def after_step(self, step: int) -> None:
        try:
            super().after_step(step)
        finally:
            self.dense_grads = {}


# ---------------------------------------------------------------------------------------------------- DSR
@dataclass
class DSRConfig(DSTConfig):
    """threshold_init: H at the start; target_pruned: N_p, the number of weights each update should prune
    (20000 for WRN-28-2, 400000 for ResNet-50); granularity: weight, or kernel (whole k x k kernel slices of a conv,
    scored by their mean |w|; then N_p and the conserved count are in slices, a linear layer's slice being one
    weight). Defaults: DSR's period schedule; stem, shortcuts and classifier dense."""

    targets: TargetConfig = field(
        default_factory=lambda: TargetConfig(exclude_roles=["stem", "shortcut", "classifier"]))
    period_epochs: list[int] = field(default_factory=lambda: [0, 25, 80, 140])
    periods: list[int] = field(default_factory=lambda: [100, 200, 400, 800])
    threshold_init: float = 1e-3
    target_pruned: int = 20000
    granularity: Literal["weight", "kernel"] = "weight"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity not in ("weight", "kernel"):
            raise ValueError(f"granularity must be weight or kernel, got {self.granularity!r}")
        if not self.threshold_init > 0.0:
            raise ValueError(f"threshold_init must be positive, got {self.threshold_init}")
        if self.target_pruned < 1:
            raise ValueError(f"target_pruned must be at least 1, got {self.target_pruned}")


def dsr_shares(total: int, survivors: list[int], capacity: list[int], generator: torch.Generator) -> list[int]:
    """Split ``total`` regrowths: layer l gets floor(total * R_l / sum R), the remainder goes to one random layer,
    and what exceeds a layer's capacity spills over the same way to the layers that still have room."""
    if total > sum(capacity):
        raise ValueError(f"cannot regrow {total} weights in capacity {sum(capacity)}")
    counts = [0] * len(survivors)
    remaining = total
    free = [i for i, c in enumerate(capacity) if c > 0]
    while remaining > 0:
        weight = sum(survivors[i] for i in free)
        shares = {i: (remaining * survivors[i]) // weight if weight > 0 else 0 for i in free}
        lucky = free[int(torch.randint(len(free), (1,), generator=generator))]
        shares[lucky] += remaining - sum(shares.values())
        for i, share in shares.items():
            counts[i] += min(share, capacity[i] - counts[i])
        remaining = total - sum(counts)
        free = [i for i in free if counts[i] < capacity[i]]
    return counts


@register_method("dsr")
class DSR(DynamicSparse):
    """Dynamic sparse reparameterisation, as ALGORITHMS.md section 3 writes it.

    (1) Drop every active weight with |w| < H (one global threshold), but keep each layer's largest active weight
    so no layer empties. (2) K = the number dropped; layer l regrows floor(K R_l / sum R) (R_l = its surviving
    active count), the remainder going to one random layer, with overflow beyond a layer's capacity (its inactive
    positions, the just-dropped excluded) spilled over the same way. (3) Regrow at random inactive positions, the
    just-dropped excluded, new weights zero (``grow_init``). (4) H halves if K > 1.1 N_p and doubles if K < 0.9 N_p.
    If more weights fall under H than the network has room to regrow (only above ~50% density), only the smallest
    ones that fit are dropped, so the active count is conserved.
    """

    Config = DSRConfig
    config: DSRConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.threshold = self.config.threshold_init
        self.last_pruned = 0

    # ------------------------------------------------------------ units: weights, or kernel slices
    def units(self, name: str) -> tuple[int, int]:
        """(number of units, weights per unit) of a layer: single weights, or k x k kernel slices of a conv."""
        param = self.params[name]
        if self.config.granularity == "weight" or param.dim() <= 2:
            return param.numel(), 1
        return param.shape[0] * param.shape[1], param[0, 0].numel()

    def unit_mask(self, name: str) -> torch.Tensor:
        """The layer's mask per unit (kernel masks are whole slices: one entry stands for its slice)."""
        assert self.masks is not None
        return self.masks[name].reshape(self.units(name)[0], -1)[:, 0]

    def unit_magnitude(self, name: str) -> torch.Tensor:
        """|w| per unit: the weight's own, or the mean over its kernel slice."""
        return self.params[name].detach().abs().reshape(self.units(name)[0], -1).mean(1)

    def unit_random(self, step: int, purpose: str, name: str) -> torch.Tensor:
        return torch.rand(self.units(name)[0], generator=seeded_generator(self.context.seed, step,
                                                                          f"{purpose}/{name}"))

    def to_weights(self, name: str, unit_mask: torch.Tensor) -> torch.Tensor:
        """A per-unit mask as the layer's full mask."""
        param = self.params[name]
        count, size = self.units(name)
        return unit_mask.to(param.device).reshape(count, 1).expand(count, size).reshape(param.shape)

    def active_count(self) -> int:
        assert self.masks is not None
        return sum(int(self.unit_mask(name).sum()) for name in self.params)

    def setup(self) -> None:
        """Weight granularity: as every DST method. Kernel: random whole slices, each layer at the distribution's
        density of its slices (apportioned by largest remainder; exactly round(density * slices) when uniform)."""
        if self.config.granularity == "weight":
            super().setup()
            return
        densities = distribution_densities(self.params, self.config.density, self.config.distribution)
        counts = [self.units(n)[0] for n in self.params]
        shares = [densities[n] * c for n, c in zip(self.params, counts)]    # each layer at its own density
        kept = apportion(round(sum(shares)), shares, counts)
        self.masks = MaskSet(self.params)
        self.masks.update({n: self.to_weights(n, keep_top_k(self.unit_random(0, "init", n), k))
                           for n, k in zip(self.params, kept)}, optimizer=self.optimizer)

    # ------------------------------------------------------------ the update
    def new_masks(self, step: int) -> dict[str, torch.Tensor]:
        assert self.masks is not None
        names = list(self.params)
        masks = {n: self.unit_mask(n) for n in names}
        drop: dict[str, torch.Tensor] = {}
        for name in names:
            mask = masks[name]
            magnitude = self.unit_magnitude(name).masked_fill(~mask, math.inf)
            below = mask & (magnitude < self.threshold)
            if mask.any() and bool((below == mask).all()):                # would empty the layer: keep its largest
                largest = torch.argmax(magnitude.masked_fill(~mask, -math.inf))
                below[largest] = False
            drop[name] = below
        capacity = [int((~masks[n]).sum()) for n in names]
        drop = self._fit_capacity(drop, sum(capacity))
        survivors = [int((masks[n] & ~drop[n]).sum()) for n in names]
        pruned = sum(int(d.sum()) for d in drop.values())
        shares = dsr_shares(pruned, survivors, capacity, seeded_generator(self.context.seed, step, "dsr/remainder"))
        new = {}
        for name, count in zip(names, shares):
            scores = self.unit_random(step, "grow", name).to(masks[name].device).masked_fill(masks[name], -math.inf)
            new[name] = self.to_weights(name, (masks[name] & ~drop[name]) | keep_top_k(scores, count))
        self.last_pruned = pruned
        n_p = self.config.target_pruned
        if pruned > 1.1 * n_p:
            self.threshold /= 2.0
        elif pruned < 0.9 * n_p:
            self.threshold *= 2.0
        return new

    def _fit_capacity(self, drop: dict[str, torch.Tensor], room: int) -> dict[str, torch.Tensor]:
        """Keep only the ``room`` smallest units of the drop set (ties by position) when it exceeds the room."""
        if sum(int(d.sum()) for d in drop.values()) <= room:
            return drop
        scores = {n: (-self.unit_magnitude(n)).masked_fill(~d, -math.inf) for n, d in drop.items()}
        return global_top_k(scores, room)

    def layer_targets(self) -> dict[str, float] | None:
        """None: DSR moves weights between layers on purpose, so the initial distribution is no target."""
        return None

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out["dsr/threshold"] = self.threshold
        out["dsr/pruned"] = float(self.last_pruned)
        for name, change in self.last_changes.items():
            out[f"dsr/reallocated/{name}"] = float(change.grown - change.dropped)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["threshold"] = self.threshold
        state["last_pruned"] = self.last_pruned
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        assert self.masks is not None
        for name in self.params:
            if not torch.equal(self.to_weights(name, self.unit_mask(name)), self.masks[name]):
                raise ValueError(f"the checkpoint's mask of {name} is not made of whole kernel slices; resume with "
                                 "the sparsity.granularity it was trained with")
        self.threshold = float(state.get("threshold", self.config.threshold_init))
        self.last_pruned = int(state.get("last_pruned", 0))

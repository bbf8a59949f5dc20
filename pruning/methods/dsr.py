"""DSR: dynamic sparse reparameterisation (Mostafa and Wang, 2019), as ALGORITHMS.md section 3 writes it.

A DST method (``pruning.methods.dst``) whose drop is one global magnitude threshold H adapted towards N_p pruned
weights per update, and whose regrowth reallocates weights between layers by their surviving counts. Its
granularity (single weights, or whole k x k kernel slices scored by their mean |w|) is a scope: counts, N_p and the
conserved count are in the scope's units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pruning.agreement import seeded_generator
from pruning.methods.base import MethodConfig, MethodContext, register_method
from pruning.methods.dst import DSTConfig, DynamicSparse, Grads
from pruning.scopes import Scope, build_scope, shapes_of
from pruning.selection import global_top_k, keep_top_k
from pruning.targets import TargetConfig

DSR_GRANULARITIES = {"weight": "layer", "kernel": "kernel"}   # config word -> registered scope


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
        if self.granularity not in DSR_GRANULARITIES:
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
    """Dynamic sparse reparameterisation, as the method specification writes it.

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

    def make_scope(self) -> Scope:
        """Weights or kernel slices, per layer, the initial budgets spread by the distribution."""
        return build_scope(DSR_GRANULARITIES[self.config.granularity], shapes_of(self.params),
                           self.config.distribution)

    # ------------------------------------------------------------ units: weights, or kernel slices
    def unit_mask(self, name: str) -> torch.Tensor:
        """The layer's mask per unit."""
        return self.scope.unit_view(name, self.masks[name])

    def unit_magnitude(self, name: str) -> torch.Tensor:
        """|w| per unit: the weight's own, or the mean over its kernel slice."""
        return self.scope.unit_scores(name, self.params[name].detach().abs())

    def unit_random(self, step: int, purpose: str, name: str) -> torch.Tensor:
        return torch.rand(self.scope.units(name)[0], generator=seeded_generator(self.context.seed, step,
                                                                                f"{purpose}/{name}"))

    # ------------------------------------------------------------ the update
    def new_masks(self, step: int, grads: Grads) -> dict[str, torch.Tensor]:
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
            new[name] = self.scope.expand(name, (masks[name] & ~drop[name]) | keep_top_k(scores, count))
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
        """Restore H; the masks, restored first, must be made of whole units of this granularity."""
        super().load_state_dict(state)
        for name in self.params:
            if not self.scope.is_whole(name, self.masks[name]):
                raise ValueError(f"the checkpoint's mask of {name} is not made of whole kernel slices; resume with "
                                 "the sparsity.granularity it was trained with")
        self.threshold = float(state.get("threshold", self.config.threshold_init))
        self.last_pruned = int(state.get("last_pruned", 0))

"""Scopes: how a density becomes exact budgets, and what one selectable unit is.

A scope is built once for the shapes of the prunable weights (``build_scope(name, shapes)``; each method config maps
its own word, e.g. unit pruning's ``layer``, to a registered name) and is the one place that knows how budgets are counted,
so no method branches on a scope's name:

- ``select(scores, density, kept=None)``: masks keeping the highest scores with exact budgets;
- ``check(masks, density)``: raise :class:`BudgetError` naming the first group whose count misses its budget;
- ``targets(density)``: per-layer target densities for monitoring (None when layers have no target of their own).

Registered scopes (N = weights, U = output units, S = kernel slices; ``_l`` one layer's):

- ``global``: round(d * N) weights with one threshold across layers;
- ``layer``: round(d * N_l) weights per layer; given a distribution (uniform, ER, ERK), round(d * N) apportioned over
  layers by the distribution's densities (at-init's ``layer``, the DST start);
- ``row``: round(d * fan_in) weights in every output row / filter (gradual's ``unit``);
- ``neuron_layer`` / ``neuron_global``: round(d * U_l) / round(d * U) whole output units (rows of a linear weight,
  filters of a conv) scored by the L2 norm of their weights' scores;
- ``neuron_fit``: whole units by one ranking while their weights fit in round(d * N) (structured SNIP);
- ``kernel``: whole k x k kernel slices scored by their mean, round(d * S_l) per layer, or apportioned like ``layer``.

A unit's score aggregates its weights' scores (``unit_scores``); ``select_units`` takes one score per unit directly
(e.g. random scores drawn per unit). Carry (``kept`` given): units not kept score -inf and no group's budget exceeds
what it keeps, so masks only shrink.

N:M sparsity (``build_scope(..., nm=(n, m))``, :class:`NMScope`): every group of M consecutive weights of a row of the
weight viewed as (out, K) keeps exactly round(d * M) of them, n at density n / M. K is the fan-in in torch's memory
order (a linear's in_features; a conv's in_channels * kh * kw, channel outermost), the matrix a 2-D semi-structured
kernel and im2col multiply, so a group never spans two rows; NVIDIA's ASP groups a conv's input channels at one
kernel position instead (channels-last implicit GEMM), a different pattern for kernels larger than 1 x 1.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from pruning.agreement import seeded_generator
from common.registry import Registry
from pruning.selection import (Distribution, apportion, global_prune_at_or_below, global_top_k, keep_top_k,
                               keep_top_k_per_row, keep_top_units, layer_counts, layer_densities, prune_at_or_below)

Masks = Mapping[str, torch.Tensor]
SelectionRule = Literal["exact", "reference"]
SELECTION_RULES: tuple[str, ...] = ("exact", "reference")
"""exact: keep round(d * N) (per group), ties to the lowest index, checked exactly (the default). reference: the
Synaptic Flow code's rule, prune every score at or below the k-th smallest with k = floor((1 - d) * N), pruned weights
counting as score 0; ties at the threshold all go, so it may keep fewer than asked (reported, not checked)."""


class BudgetError(RuntimeError):
    """A mask misses its exact budget: a bug in the method, never an accepted approximation."""


# ---------------------------------------------------------------------------------------------------- units
class Granularity:
    """One selectable unit is one weight."""

    noun: ClassVar[str] = "weights"

    def units(self, shape: torch.Size) -> tuple[int, int]:
        """(units in a tensor of ``shape``, weights per unit)."""
        return math.prod(shape), 1

    def aggregate(self, scores: torch.Tensor) -> torch.Tensor:
        """One score per unit, flat."""
        return scores.reshape(-1)

    def view(self, mask: torch.Tensor) -> torch.Tensor:
        """One entry per unit, flat: kept when any of its weights is kept."""
        count, size = self.units(mask.shape)
        return mask.reshape(-1) if size == 1 else mask.reshape(count, size).any(1)

    def expand(self, unit_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A per-unit mask as a mask of the whole tensor."""
        count, size = self.units(shape)
        return unit_mask.reshape(count, 1).expand(count, size).reshape(shape)


class Neurons(Granularity):
    """One output unit (dim 0: a row of a linear weight, a filter of a conv), scored by the L2 norm of its scores."""

    noun = "units"

    def units(self, shape: torch.Size) -> tuple[int, int]:
        return shape[0], math.prod(shape[1:])

    def aggregate(self, scores: torch.Tensor) -> torch.Tensor:
        rows = scores.reshape(scores.shape[0], -1)
        return (rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows).norm(dim=1)


class KernelSlices(Granularity):
    """One k x k kernel slice of a conv (one filter's input channel), scored by its mean; a linear's slice is a
    single weight."""

    noun = "slices"

    def units(self, shape: torch.Size) -> tuple[int, int]:
        if len(shape) <= 2:
            return math.prod(shape), 1
        return shape[0] * shape[1], math.prod(shape[2:])

    def aggregate(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.reshape(self.units(scores.shape)[0], -1).mean(1)


# ---------------------------------------------------------------------------------------------------- scopes
class Scope(abc.ABC):
    """Budgets over groups of units of the named tensors; see the module docstring for the registered ones.

    ``distribution`` (uniform, ER, ERK) spreads one total over layers; scopes with no per-layer budgets (``spreads``
    false) accept only None or uniform, which changes nothing for them.
    """

    name: ClassVar[str] = ""
    unit: ClassVar[Granularity] = Granularity()
    spreads: ClassVar[bool] = False

    def __init__(self, shapes: Mapping[str, Sequence[int]], distribution: Distribution | None = None) -> None:
        if distribution not in (None, "uniform") and not self.spreads:
            raise ValueError(f"distribution '{distribution}' sets per-layer budgets; the {self.name} scope has none")
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.distribution = distribution if self.spreads else None

    # ------------------------------------------------------------ units
    def units(self, name: str) -> tuple[int, int]:
        """(units of layer ``name``, weights per unit)."""
        return self.unit.units(self.shapes[name])

    def unit_scores(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """One score per unit of layer ``name`` from its weights' scores."""
        return self.unit.aggregate(scores)

    def unit_view(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """Layer ``name``'s mask per unit (kept when any of its weights is)."""
        return self.unit.view(mask)

    def expand(self, name: str, unit_mask: torch.Tensor) -> torch.Tensor:
        """A per-unit mask of layer ``name`` as the layer's full mask."""
        return self.unit.expand(unit_mask, self.shapes[name])

    def is_whole(self, name: str, mask: torch.Tensor) -> bool:
        """Whether ``mask`` keeps or prunes whole units (a checkpoint of another granularity does not)."""
        return torch.equal(self.expand(name, self.unit_view(name, mask)), mask)

    # ------------------------------------------------------------ selection
    def select(self, scores: Masks, density: float, kept: Masks | None = None,
               rule: SelectionRule = "exact") -> dict[str, torch.Tensor]:
        """Full masks keeping the highest per-weight ``scores`` at ``density``; ``kept``: carry (see module);
        ``rule``: see :data:`SELECTION_RULES`."""
        units = {name: self.unit_scores(name, s) for name, s in scores.items()}
        return self.select_units(units, density, kept, rule)

    def select_units(self, scores: Masks, density: float, kept: Masks | None = None,
                     rule: SelectionRule = "exact") -> dict[str, torch.Tensor]:
        """Full masks keeping the highest per-unit ``scores`` (flat, one per unit) at ``density``."""
        alive = None if kept is None else {name: self.unit_view(name, kept[name]).to(s.device)
                                           for name, s in scores.items()}
        if rule == "reference":
            chosen = self.top_at_or_below(scores, density, alive)
        elif rule == "exact":
            chosen = self.top(scores, density, alive)
        else:
            raise ValueError(f"selection rule must be one of {', '.join(SELECTION_RULES)}, got {rule!r}")
        return {name: self.expand(name, keep) for name, keep in chosen.items()}

    @abc.abstractmethod
    def top(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        """Per-unit keep masks at this scope's budgets, each capped by the units ``alive`` in its group (units not
        alive are never kept)."""

    def top_at_or_below(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        """Per-unit keep masks by the Synaptic Flow code's threshold rule (scopes with one ranking per group)."""
        raise ValueError(f"selection: reference is the Synaptic Flow code's rule for one threshold over all layers "
                         f"(global) or per layer (layer); the {self.name} scope has only the exact rule")

    def at_or_below_counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        """(group, units kept, what the reference rule keeps when no scores tie: N - floor((1 - d) N))."""
        raise ValueError(f"the {self.name} scope has only the exact rule")

    @staticmethod
    def dead_last(scores: Masks, alive: Masks | None) -> Masks:
        """Scores with the units not alive at -inf (for scopes that rank every unit)."""
        if alive is None:
            return scores
        return {name: s.masked_fill(~alive[name], -math.inf) for name, s in scores.items()}

    # ------------------------------------------------------------ budgets
    @abc.abstractmethod
    def counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        """(group, units kept, budget) for every group of the scope."""

    def check(self, masks: Masks, density: float) -> None:
        """Raise :class:`BudgetError` naming the first group that misses its exact budget."""
        for group, kept, budget in self.counts(masks, density):
            if kept != budget:
                raise BudgetError(f"{group} keeps {kept} {self.unit.noun}, the target is {budget} "
                                  f"(density {density:g})")

    def targets(self, density: float) -> dict[str, float] | None:
        """Target density per layer, for monitoring; None when only the whole has a target."""
        return None

    def kept_units(self, masks: Masks) -> dict[str, int]:
        """Units kept per layer."""
        return {name: int(torch.count_nonzero(self.unit_view(name, mask))) for name, mask in masks.items()}


_SCOPES: Registry[type[Scope]] = Registry("selection scope", "scope")


def register_scope(name: str) -> Callable[[type[Scope]], type[Scope]]:
    """Class decorator: make a scope available to ``build_scope`` as ``name``."""
    return _SCOPES.register(name)


def scope_class(name: str) -> type[Scope]:
    return _SCOPES.get(name)


def list_scopes() -> list[str]:
    return _SCOPES.names()


def build_scope(name: str, shapes: Mapping[str, Sequence[int]], distribution: Distribution | None = None,
                nm: Sequence[int] | None = None) -> Scope:
    """The scope registered as ``name`` over tensors of these ``shapes``; ``nm`` (N, M) given, the N:M scope instead
    (its groups are its budgets, so it takes the place of ``name``)."""
    if nm is not None:
        n, m = parse_nm(nm)
        return NMScope(shapes, n, m, distribution)
    return scope_class(name)(shapes, distribution)


def shapes_of(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in params.items()}


def random_masks(scope: Scope, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Masks at the scope's exact budgets from U(0, 1) unit scores of the (seed, 0, init/<layer>) stream: the same on
    every rank with no communication (the start of DST and Deep R)."""
    scores = {name: torch.rand(scope.units(name)[0], generator=seeded_generator(seed, 0, f"init/{name}"))
              for name in scope.shapes}
    return scope.select_units(scores, density)


# ---------------------------------------------------------------------------------------------------- registered
@register_scope("global")
class GlobalScope(Scope):
    """One threshold across all layers: round(d * units) in total."""

    def budget(self, density: float) -> int:
        return round(density * sum(self.units(name)[0] for name in self.shapes))

    def top(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        k = self.budget(density)
        if alive is not None:
            k = min(k, sum(int(torch.count_nonzero(a)) for a in alive.values()))
        return global_top_k(scores, k, alive)

    def top_at_or_below(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        return global_prune_at_or_below(scores, density, alive)

    def at_or_below_counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        total = sum(self.units(name)[0] for name in self.shapes)
        yield "all layers", sum(self.kept_units(masks).values()), total - max(int((1.0 - density) * total), 0)

    def counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        yield "all layers", sum(self.kept_units(masks).values()), self.budget(density)


@register_scope("layer")
class LayerScope(Scope):
    """Each layer to its own budget: round(d * units_l), or the distribution's apportioned counts."""

    spreads = True

    def budgets(self, density: float) -> dict[str, int]:
        if self.distribution is None:
            return {name: round(density * self.units(name)[0]) for name in self.shapes}
        return self.spread(density)

    def spread(self, density: float) -> dict[str, int]:
        """round(d * N) weights apportioned over layers by the distribution's densities (largest remainder)."""
        assert self.distribution is not None
        return layer_counts(self.shapes, density, self.distribution)

    def top(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        budgets = self.budgets(density)
        if alive is None:
            return {name: keep_top_k(s, budgets[name]) for name, s in scores.items()}
        out = {}
        for name, s in scores.items():
            live = alive[name]
            keep = torch.zeros_like(live)
            keep[live] = keep_top_k(s[live], min(budgets[name], int(torch.count_nonzero(live))))
            out[name] = keep
        return out

    def at_or_below_counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        densities, kept = self.targets(density) or {}, self.kept_units(masks)
        for name in self.shapes:
            units = self.units(name)[0]
            yield name, kept[name], units - max(int((1.0 - densities[name]) * units), 0)

    def top_at_or_below(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        densities = self.targets(density) or {}
        out = {}
        for name, s in scores.items():
            k = int((1.0 - densities[name]) * s.numel())
            if alive is None:
                out[name] = prune_at_or_below(s, k)
            else:
                live = alive[name]
                keep = torch.zeros_like(live)
                keep[live] = prune_at_or_below(s[live], k, below=s.numel() - int(torch.count_nonzero(live)))
                out[name] = keep
        return out

    def counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        budgets, kept = self.budgets(density), self.kept_units(masks)
        for name in self.shapes:
            yield name, kept[name], budgets[name]

    def targets(self, density: float) -> dict[str, float] | None:
        if self.distribution is None:
            return {name: density for name in self.shapes}
        return layer_densities(self.shapes, density, self.distribution)


@register_scope("row")
class RowScope(Scope):
    """Every output row / filter keeps round(d * fan_in) of its weights (the `sparsity` work's per-unit default)."""

    def row_budget(self, name: str, density: float) -> int:
        return round(density * math.prod(self.shapes[name][1:]))

    def top(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        out = {}
        for name, s in self.dead_last(scores, alive).items():
            rows = s.reshape(self.shapes[name][0], -1)
            k = torch.full((rows.shape[0],), self.row_budget(name, density), device=s.device)
            if alive is not None:
                k = torch.minimum(k, alive[name].reshape(rows.shape).sum(1))
            out[name] = keep_top_k_per_row(rows, k).reshape(-1)
        return out

    def counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        for name, mask in masks.items():
            budget = self.row_budget(name, density)
            for i, kept in enumerate(mask.reshape(mask.shape[0], -1).sum(1).tolist()):
                yield f"{name} row {i}", kept, budget

    def targets(self, density: float) -> dict[str, float] | None:
        return {name: density for name in self.shapes}


@register_scope("neuron_layer")
class NeuronLayerScope(LayerScope):
    """Whole output units, round(d * units_l) per layer, by the L2 norm of their scores."""

    unit = Neurons()
    spreads = False


@register_scope("neuron_global")
class NeuronGlobalScope(GlobalScope):
    """Whole output units, round(d * units) with one threshold across layers (a layer may lose them all)."""

    unit = Neurons()


@register_scope("neuron_fit")
class NeuronFitScope(Scope):
    """Whole output units by one ranking, kept while their weights fit in round(d * N): the budget is in weights, so
    the kept count falls short of it by less than the largest unit."""

    unit = Neurons()

    def budget(self, density: float) -> int:
        return round(density * sum(math.prod(shape) for shape in self.shapes.values()))

    def top(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        sizes = {name: self.units(name)[1] for name in scores}
        return keep_top_units(self.dead_last(scores, alive), sizes, self.budget(density))

    def counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        yield "all layers", sum(int(torch.count_nonzero(m)) for m in masks.values()), self.budget(density)

    def check(self, masks: Masks, density: float) -> None:
        largest = max(self.units(name)[1] for name in self.shapes)
        for group, kept, budget in self.counts(masks, density):
            if not budget - largest < kept <= budget:
                raise BudgetError(f"{group} keep {kept} weights for a budget of {budget} (whole units of at most "
                                  f"{largest} must fit it within one unit)")


@register_scope("kernel")
class KernelScope(LayerScope):
    """Whole k x k kernel slices by their mean score, per layer; a distribution gives each layer its density of
    slices, apportioned by largest remainder (exactly round(d * S) slices in all when uniform)."""

    unit = KernelSlices()

    def spread(self, density: float) -> dict[str, int]:
        assert self.distribution is not None
        densities = layer_densities(self.shapes, density, self.distribution)
        counts = [self.units(name)[0] for name in self.shapes]
        shares = [densities[name] * count for name, count in zip(self.shapes, counts)]
        return dict(zip(self.shapes, apportion(round(sum(shares)), shares, counts)))


# ---------------------------------------------------------------------------------------------------- N:M
def parse_nm(value: object, key: str = "nm") -> tuple[int, int]:
    """(N, M) from a config value ``[N, M]``; a one-line ValueError naming ``key`` otherwise."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{key} must be [N, M], two integers (keep N of every M consecutive weights, e.g. [2, 4]), "
                         f"got {value!r}")
    n, m = value
    if not 1 <= n < m:
        raise ValueError(f"{key} [{n}, {m}] must have 1 <= N < M (N of every M weights kept; N = M prunes nothing)")
    return n, m


def check_nm_density(nm: Sequence[int], density: float, key: str = "density") -> None:
    """Refuse a density other than N / M: under N:M the density is not a free choice."""
    n, m = parse_nm(nm)
    if not math.isclose(density, n / m, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"nm [{n}, {m}] keeps {n} of every {m} weights, density {n / m:g}; set {key} to {n / m:g} "
                         f"(got {density:g})")


def nm_refusals(shapes: Mapping[str, Sequence[int]], m: int) -> list[str]:
    """The tensors whose rows cannot be cut into groups of ``m`` (fan-in not a multiple of it, or 1-D)."""
    return [name for name, shape in shapes.items() if len(shape) < 2 or math.prod(shape[1:]) % m]


class NMScope(Scope):
    """N:M: in every group of M consecutive weights along a row's fan-in keep the round(d * M) highest scores (N at
    density N / M); ties go to the lower index. Budgets and the check are per group, all groups of all layers alike.

    Layers whose fan-in is not a multiple of M are refused in one line naming them (a first conv with 3 input
    channels, fan-in 27): the usual practice is to leave them dense, which ``sparsity.targets.exclude`` does.
    """

    name = "nm"

    def __init__(self, shapes: Mapping[str, Sequence[int]], n: int, m: int,
                 distribution: Distribution | None = None) -> None:
        super().__init__(shapes, distribution)
        self.n, self.m = parse_nm((n, m))
        bad = nm_refusals(self.shapes, m)
        if bad:
            fan_in = math.prod(self.shapes[bad[0]][1:]) if len(self.shapes[bad[0]]) > 1 else 1
            raise ValueError(f"nm [{n}, {m}] needs every prunable layer's fan-in to be a multiple of {m}; "
                             f"{bad[0]} has {fan_in}" + (f" ({len(bad) - 1} more layers too)" if len(bad) > 1 else "")
                             + f": leave it dense with sparsity.targets.exclude=[{', '.join(bad)}]")

    def group_budget(self, density: float) -> int:
        """Weights kept in every group of M at ``density`` (N at N / M)."""
        return round(density * self.m)

    def top(self, scores: Masks, density: float, alive: Masks | None) -> dict[str, torch.Tensor]:
        budget = self.group_budget(density)
        out = {}
        for name, s in self.dead_last(scores, alive).items():
            groups = s.reshape(-1, self.m)
            counts: torch.Tensor | int = budget
            if alive is not None:
                counts = torch.clamp(alive[name].reshape(groups.shape).sum(1), max=budget)
            out[name] = keep_top_k_per_row(groups, counts).reshape(-1)
        return out

    def counts(self, masks: Masks, density: float) -> Iterator[tuple[str, int, int]]:
        budget = self.group_budget(density)
        for name, mask in masks.items():
            yield name, int(torch.count_nonzero(mask)), budget * (mask.numel() // self.m)

    def check(self, masks: Masks, density: float) -> None:
        """Every group of every layer keeps exactly round(d * M): raise naming the first group that does not."""
        budget = self.group_budget(density)
        for name in self.shapes:
            kept = masks[name].reshape(-1, self.m).sum(1)
            wrong = torch.nonzero(kept != budget)
            if wrong.numel():
                group = int(wrong[0])
                row, first = divmod(group * self.m, math.prod(self.shapes[name][1:]))
                raise BudgetError(f"{name} row {row} weights {first}..{first + self.m - 1} keep {int(kept[group])} "
                                  f"of {self.m}, the pattern is {budget}:{self.m} (density {density:g})")

    def check_pattern(self, masks: Masks) -> None:
        """The final N:M pattern exactly (the MaskSet's ``pattern_check`` once a method's masks are N:M)."""
        self.check(masks, self.n / self.m)

    def targets(self, density: float) -> dict[str, float] | None:
        return {name: self.group_budget(density) / self.m for name in self.shapes}

"""Pruning at initialisation: score the weights, keep the best, before any training step.

The loop follows the Synaptic Flow work: for k = 1..n, score all prunable weights and keep the top density_k of them,
with density_k = rho^(k/n) (exponential) or 1 - (1 - rho) (k / n) (linear) (``pruning.timing.IterationDensities``).
Only weights still alive compete, so masks are nested. A scorer only has to say how it scores (``scores``); the scope
(global: one threshold; layer: per-layer budgets from ``distribution``) says how scores become masks.

Two selection rules (``selection``, see ``pruning.scopes.SELECTION_RULES``): ``exact`` keeps round(density_k * N) with
ties to the lowest index and checks the count at the end (the default); ``reference`` is the Synaptic Flow code's
threshold (prune every score at or below the k-th smallest, k = floor((1 - density_k) * N), ties all go). Iterative
SynFlow is chaotic in the rule: the two differ by one or two weights in about half of the 100 iterations and the final
masks drift apart (IoU 0.66 at 10^3 on VGG-16-BN), so only the reference's rule reproduces its masks. Under it the
count is not checked; a shortfall against round(rho * N) is reported in ``selection_note``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from pruning.agreement import seeded_generator
from pruning.methods.base import MaskedMethod, MethodConfig, MethodContext, register_method
from pruning.scopes import (NMScope, SelectionRule, Scope, build_scope, check_nm_density, parse_nm, scope_class,
                            shapes_of)
from pruning.targets import TargetConfig, prunable_parameters
from pruning.timing import IterationDensities

AT_INIT_SCOPES = {"global": "global", "layer": "layer"}   # config word -> registered scope


@dataclass
class AtInitConfig(MethodConfig):
    """density: fraction kept; scope global = one threshold, layer = per-layer budgets from ``distribution``;
    selection: exact (keep round(d N), checked) or reference (the Synaptic Flow code's threshold rule, for
    reproductions: ties at the threshold are all pruned, a shortfall is reported instead of failing); nm: [N, M]
    keeps N of every M consecutive weights of each row's fan-in (``pruning.scopes.NMScope``) in place of the scope:
    density must be N / M, the rule exact, the distribution uniform."""

    density: float = 0.1
    renamed: ClassVar[dict[str, str]] = {
        "scope=local": "write sparsity.scope=layer (per-layer budgets: one word for it across methods)"}
    scope: Literal["global", "layer"] = "global"   # global: one threshold; layer: per-layer budgets
    distribution: Literal["uniform", "er", "erk"] = "uniform"   # per-layer budgets (scope layer only)
    iterations: int = 1   # score-and-prune rounds n; masks are nested
    schedule: Literal["exponential", "linear"] = "exponential"   # density after round k (iterations > 1)
    selection: SelectionRule = "exact"
    nm: list[int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1] (the fraction of weights kept), got {self.density}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.scope not in AT_INIT_SCOPES:
            raise ValueError(f"scope must be one of {', '.join(AT_INIT_SCOPES)}, got {self.scope!r}")
        if self.distribution != "uniform" and not scope_class(AT_INIT_SCOPES[self.scope]).spreads:
            raise ValueError(f"distribution '{self.distribution}' sets per-layer budgets; it needs scope: layer "
                             "(set sparsity.scope=layer)")
        if self.nm is not None:     # every contradiction in one line, so one fix of the command line suffices
            self.nm = list(parse_nm(self.nm, "sparsity.nm"))
            problems = []
            try:
                check_nm_density(self.nm, self.density, "sparsity.density")
            except ValueError as error:
                problems.append(str(error))
            if self.selection != "exact":
                problems.append("sparsity.nm keeps exactly N of every M: it needs sparsity.selection=exact")
            if self.distribution != "uniform":
                problems.append("sparsity.nm gives every group of M the same budget: it needs "
                                "sparsity.distribution=uniform")
            if problems:
                raise ValueError("; ".join(problems))

    def check_length(self, steps_per_epoch: int, epochs: int) -> list[str]:
        """Warn (a sweep may mean it): a density schedule over one iteration is the final density; density 1 prunes
        nothing."""
        notes = []
        if self.iterations == 1 and self.schedule != "exponential":
            notes.append(f"sparsity.schedule={self.schedule} has no effect with sparsity.iterations=1 (one iteration "
                         "prunes straight to the density); set sparsity.iterations above 1 for a schedule")
        if self.density >= 1.0:
            notes.append(f"sparsity.density=1 keeps every weight: {self.method} prunes nothing and the run is dense")
        return notes


def check_nm_layers(nm: list[int] | None, model: torch.nn.Module, targets: TargetConfig) -> None:
    """One-line ValueError when ``nm`` is set and a prunable layer of ``model`` cannot be cut into groups of M."""
    if nm is not None:
        build_scope("layer", shapes_of(prunable_parameters(model, targets)), nm=nm)


class PruneAtInit(MaskedMethod, abc.ABC):
    """Base of every pruning-at-init method: subclasses supply ``scores`` (and may choose another ``scope_names``)."""

    Config = AtInitConfig
    config: AtInitConfig
    scope_names: ClassVar[dict[str, str]] = AT_INIT_SCOPES
    score_cache: dict[int, dict[str, torch.Tensor]] | None = None
    selection_note: str | None = None

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.scope: Scope = build_scope(self.scope_names[self.config.scope], shapes_of(self.params),
                                        self.config.distribution, nm=self.config.nm)
        if isinstance(self.scope, NMScope):   # the final masks (and any later update) must hold the pattern exactly
            self.masks.pattern_check = self.scope.check_pattern
        self.densities = IterationDensities(self.config.density, self.config.iterations, self.config.schedule)

    @classmethod
    def check_model(cls, config: MethodConfig, model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
        """nm: refuse, before any worker starts, prunable layers whose fan-in is not a multiple of M."""
        super().check_model(config, model, input_shape)
        check_nm_layers(getattr(config, "nm", None), model, config.targets)

    @abc.abstractmethod
    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        """Higher = more worth keeping; one tensor per prunable parameter, shaped like it."""

    def setup(self) -> None:
        rule = self.config.selection
        for k, density in self.densities:
            if density >= 1.0:   # nothing to prune (compression 0): skip the scoring pass
                continue
            scores = {name: s.detach() for name, s in self.cached_scores(k).items()}
            kept = dict(self.masks.items())
            self.masks.update(self.scope.select(scores, density, kept, rule), optimizer=self.optimizer,
                              check=k == self.config.iterations)
        if rule == "exact":
            self.check_budget(self.scope, self.config.density)
        else:
            self.selection_note = self.shortfall()

    def cached_scores(self, iteration: int) -> dict[str, torch.Tensor]:
        """``scores(iteration)``, from ``score_cache`` when one is given and holds it.

        A caller that prunes the same initial weights at many densities (``launcher prune``) gives one-shot
        methods a dict here so their scores (SNIP's and GraSP's passes over the data) are computed once."""
        if self.score_cache is None:
            return self.scores(iteration)
        if iteration not in self.score_cache:
            self.score_cache[iteration] = self.scores(iteration)
        return self.score_cache[iteration]

    def shortfall(self) -> str | None:
        """Where the reference rule kept fewer than its own count N - floor((1 - d) N) because scores tied at the
        threshold (that count is round(d N) give or take one: the rule floors), or None."""
        short = [(group, kept, expected) for group, kept, expected in
                 self.scope.at_or_below_counts(dict(self.masks.items()), self.config.density) if kept < expected]
        if not short:
            return None
        group, kept, expected = short[0]
        return (f"selection: reference: {group} keeps {kept} weights, the rule's count is {expected} "
                f"(density {self.config.density:g}): scores tied at the threshold were all pruned"
                + (f"; {len(short) - 1} more groups short" if len(short) > 1 else ""))

    def layer_targets(self) -> dict[str, float] | None:
        return self.scope.targets(self.config.density)


@register_method("random")
class RandomPruning(PruneAtInit):
    """Random scores N(0, 1) from a generator seeded by (seed, iteration, name): identical on every rank."""

    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        return {name: torch.randn(p.shape, generator=seeded_generator(self.context.seed, iteration, name))
                .to(p.device) for name, p in self.params.items()}


@register_method("magnitude")
class MagnitudePruning(PruneAtInit):
    """Keep the largest |theta|."""

    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        return {name: p.detach().abs() for name, p in self.params.items()}

"""Pruning at initialisation: score the weights, keep the best, before any training step.

The loop follows the Synaptic Flow work: for k = 1..n, score all prunable weights and keep the top density_k of them,
with density_k = rho^(k/n) (exponential) or 1 - (1 - rho) k / n (linear) (``pruning.timing.IterationDensities``).
Weights pruned in an earlier iteration get score -inf, so masks are nested. A scorer only has to say how it scores
(``scores``); the scope (global: one threshold; local: per-layer budgets from ``distribution``) says how scores become
masks, and checks the exact count at the end.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from pruning.agreement import seeded_generator
from pruning.methods.base import MaskedMethod, MethodConfig, MethodContext, register_method
from pruning.scopes import Scope, build_scope, scope_class, shapes_of
from pruning.timing import IterationDensities

AT_INIT_SCOPES = {"global": "global", "local": "layer"}   # config word -> registered scope


@dataclass
class AtInitConfig(MethodConfig):
    """density: fraction kept; scope global = one threshold, local = per-layer budgets from ``distribution``."""

    density: float = 0.1
    scope: Literal["global", "local"] = "global"
    distribution: Literal["uniform", "er", "erk"] = "uniform"
    iterations: int = 1
    schedule: Literal["exponential", "linear"] = "exponential"

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1] (the fraction of weights kept), got {self.density}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.scope not in AT_INIT_SCOPES:
            raise ValueError(f"scope must be one of {', '.join(AT_INIT_SCOPES)}, got {self.scope!r}")
        if self.distribution != "uniform" and not scope_class(AT_INIT_SCOPES[self.scope]).spreads:
            raise ValueError(f"distribution '{self.distribution}' sets per-layer budgets; it needs scope: local "
                             "(set sparsity.scope=local)")


class PruneAtInit(MaskedMethod, abc.ABC):
    """Base of every pruning-at-init method: subclasses supply ``scores`` (and may choose another ``scope_names``)."""

    Config = AtInitConfig
    config: AtInitConfig
    scope_names: ClassVar[dict[str, str]] = AT_INIT_SCOPES

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.scope: Scope = build_scope(self.scope_names[self.config.scope], shapes_of(self.params),
                                        self.config.distribution)
        self.densities = IterationDensities(self.config.density, self.config.iterations, self.config.schedule)

    @abc.abstractmethod
    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        """Higher = more worth keeping; one tensor per prunable parameter, shaped like it."""

    def setup(self) -> None:
        for k, density in self.densities:
            scores = {name: s.detach().masked_fill(~self.masks[name], -math.inf)
                      for name, s in self.scores(k).items()}
            self.masks.update(self.scope.select(scores, density), optimizer=self.optimizer,
                              check=k == self.config.iterations)
        self.check_budget(self.scope, self.config.density)

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

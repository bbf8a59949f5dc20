"""Pruning at initialisation: score the weights, keep the best, before any training step.

The loop follows the Synaptic Flow work: for k = 1..n, score all prunable weights and keep the top density_k of them,
with density_k = rho^(k/n) (exponential) or 1 - (1 - rho) k / n (linear). Weights pruned in an earlier iteration get
score -inf, so masks are nested. A scorer only has to say how it scores (``scores``).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Literal

import torch

from pruning.agreement import seeded_generator
from pruning.masks import MaskSet
from pruning.methods.base import MethodConfig, SparsityMethod, register_method
from pruning.selection import global_top_k, keep_top_k, layer_counts, layer_densities


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
        if self.scope == "global" and self.distribution != "uniform":
            raise ValueError(f"distribution '{self.distribution}' sets per-layer budgets; it needs scope: local "
                             "(set sparsity.scope=local)")


def iteration_density(final: float, k: int, n: int, schedule: str) -> float:
    """Density after iteration k of n."""
    if schedule == "exponential":
        return final ** (k / n)
    return 1.0 - (1.0 - final) * k / n


class PruneAtInit(SparsityMethod, abc.ABC):
    """Base of every pruning-at-init method: subclasses supply ``scores``."""

    Config = AtInitConfig
    config: AtInitConfig

    @abc.abstractmethod
    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        """Higher = more worth keeping; one tensor per prunable parameter, shaped like it."""

    def setup(self) -> None:
        cfg = self.config
        self.masks = MaskSet(self.params)
        shapes = {name: p.shape for name, p in self.params.items()}
        for k in range(1, cfg.iterations + 1):
            density = iteration_density(cfg.density, k, cfg.iterations, cfg.schedule)
            scores = {name: s.detach().masked_fill(~self.masks[name], -math.inf)
                      for name, s in self.scores(k).items()}
            if cfg.scope == "global":
                total = sum(math.prod(s) for s in shapes.values())
                new = global_top_k(scores, round(density * total))
            else:
                counts = layer_counts(shapes, density, cfg.distribution)
                new = {name: keep_top_k(scores[name], counts[name]) for name in scores}
            self.masks.update(new, optimizer=self.optimizer, check=k == cfg.iterations)
        self._check_exact(shapes)

    def _check_exact(self, shapes: dict[str, torch.Size]) -> None:
        """The kept count must equal the target exactly: a method that misses it is wrong, not approximate."""
        total = sum(math.prod(s) for s in shapes.values())
        expected = round(self.config.density * total)
        kept = sum(int(m.sum()) for _, m in self.masks.items())
        if kept != expected:
            raise RuntimeError(f"{self.name} kept {kept} weights, the target is {expected} "
                               f"(density {self.config.density} of {total})")

    def layer_targets(self) -> dict[str, float] | None:
        if self.config.scope == "global":
            return None
        shapes = {name: p.shape for name, p in self.params.items()}
        return layer_densities(shapes, self.config.density, self.config.distribution)


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

"""Iterative pruning from a dense model (ALGORITHMS.md section 3; the DSR paper's "compressed sparse" baseline).

Train densely for ``start_epoch`` epochs, then prune by magnitude ``prunes`` = n times, ``every_epochs`` = k epochs
apart, then fine-tune for the remaining epochs. Prune j (j = 0..n-1) happens when start_epoch + j*k epochs are done,
i.e. at t = (start_epoch + j*k) * steps_per_epoch optimizer steps (t = 0 is ``setup``), and leaves the density

    cubic (default):  d_{j+1} = 1 - s + s (1 - (j+1)/n)^3
    exponential:      d_{j+1} = (1 - s)^((j+1)/n)

where s = 1 - ``density`` (the final sparsity). The fraction of the remaining weights removed by prune j is therefore

    cubic:        f_j = 1 - (1 - s + s (1 - (j+1)/n)^3) / (1 - s + s (1 - j/n)^3)
    exponential:  f_j = 1 - (1 - s)^(1/n) (the same at every prune).

Each prune keeps the largest |W| of the weights still kept, with absolute counts computed from d_{j+1} (never by
compounding rounded fractions): round(d_{j+1} * N_l) in every layer (scope layer) or round(d_{j+1} * N) in all with one
threshold (scope global). The per-prune fraction equals f_j up to that rounding, and the final density is exactly
round((1 - s) * N) (per layer, or in total), checked at the last prune. Pruned weights score -inf, so masks only
shrink and a pruned weight never comes back (nothing is stored for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from pruning.methods.base import MethodConfig, MethodContext, RunFacts, register_method
from pruning.methods.gradual import ScheduledPruning
from pruning.timing import FRACTION_KINDS, FractionKind, IterativePrunes

IterativeScope = Literal["layer", "global"]
ITERATIVE_SCOPES = {"layer": "layer", "global": "global"}   # config word -> registered scope


@dataclass
class IterativeConfig(MethodConfig):
    """density: the fraction kept after the last prune (s = 1 - density); prunes n, every_epochs k apart, the first when start_epoch epochs are done; fraction: the
    per-prune schedule (cubic or exponential); scope: layer (each layer alike) or global (one threshold).

    start_epoch defaults to 1: "from dense" means the first prune sees trained magnitudes, and one epoch is the
    shortest training that gives them; 0 is allowed and prunes the initial weights at setup.
    """

    renamed: ClassVar[dict[str, str]] = {
        "final_sparsity": "use sparsity.density=<1 - final_sparsity> (the fraction kept, as in every method)"}
    density: float = 0.1
    prunes: int = 5   # n: the number of magnitude prunes
    every_epochs: int = 1   # k: epochs between prunes
    start_epoch: int = 1   # dense epochs before the first prune
    fraction: FractionKind = "cubic"
    scope: IterativeScope = "layer"

    def __post_init__(self) -> None:
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density must be in (0, 1) (the fraction of weights kept at the end), got {self.density}")
        if self.prunes < 1:
            raise ValueError(f"prunes must be at least 1, got {self.prunes}")
        if self.every_epochs < 1:
            raise ValueError(f"every_epochs must be at least 1 epoch between prunes, got {self.every_epochs}")
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0 (epochs of dense training before the first prune), "
                             f"got {self.start_epoch}")
        if self.fraction not in FRACTION_KINDS:
            raise ValueError(f"fraction must be one of {', '.join(FRACTION_KINDS)}, got {self.fraction!r}")
        if self.scope not in ITERATIVE_SCOPES:
            raise ValueError(f"scope must be one of {', '.join(ITERATIVE_SCOPES)}, got {self.scope!r}")

    @property
    def final_sparsity(self) -> float:
        """s = 1 - density, the sparsity the formulas are written in."""
        return 1.0 - self.density

    def last_prune_epoch(self) -> int:
        """Epochs done at the last prune: start_epoch + (prunes - 1) * every_epochs."""
        return self.start_epoch + (self.prunes - 1) * self.every_epochs

    def check_epochs(self, epochs: int) -> None:
        """The last prune must leave at least one epoch of fine-tuning."""
        last = self.last_prune_epoch()
        if last >= epochs:
            raise ValueError(f"sparsity.start_epoch + (prunes - 1) * every_epochs = {self.start_epoch} + "
                             f"({self.prunes} - 1) * {self.every_epochs} = {last}: the last prune leaves no "
                             f"post-prune epoch in train.epochs={epochs}; set train.epochs above {last} or lower "
                             "sparsity.start_epoch, sparsity.prunes or sparsity.every_epochs")

    def check_run(self, run: RunFacts) -> None:
        self.check_epochs(run.epochs)


@register_method("iterative")
class IterativePruning(ScheduledPruning):
    """n magnitude prunes from a dense model, k epochs apart, to exact per-prune densities (see module)."""

    Config = IterativeConfig
    config: IterativeConfig
    scope_names: ClassVar[dict[str, str]] = ITERATIVE_SCOPES

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.config.check_epochs(context.epochs)
        cfg = self.config
        self.prunes = IterativePrunes(cfg.final_sparsity, cfg.prunes, cfg.every_epochs, cfg.start_epoch, cfg.fraction,
                                      context.steps_per_epoch)
        self.prunes_done = 0
        self.last_fraction = 0.0     # realised share of the kept weights that the latest prune removed

    def keeps_values(self) -> bool:
        return False

    # ------------------------------------------------------------ pruning
    def prune_at(self, t: int) -> None:
        k = self.prunes.index(t)
        if k is None:
            return
        cfg = self.config
        last = k == cfg.prunes - 1
        density = self.prunes.density(k)
        before = sum(int(m.sum()) for _, m in self.masks.items())
        with torch.no_grad():   # kept weights only: never regrow
            self.prune(1.0 - density, carry=True, target=cfg.final_sparsity if last else 1.0 - density)
        after = sum(int(m.sum()) for _, m in self.masks.items())
        self.prunes_done = k + 1
        self.last_fraction = 1.0 - after / before if before else 0.0
        if last:
            self.check_budget(self.scope, 1.0 - cfg.final_sparsity)
        event = {"iterative/prune": float(k + 1), "iterative/target_density": density,
                 "iterative/density": after / sum(m.numel() for _, m in self.masks.items()),
                 "iterative/fraction": self.last_fraction, "iterative/fraction_target": self.prunes.fraction(k)}
        event.update({f"iterative/layer_density/{name}": int(m.sum()) / m.numel() for name, m in self.masks.items()})
        self.record(t, event)

    # ------------------------------------------------------------ reporting
    def layer_targets(self) -> dict[str, float] | None:
        return self.scope.targets(self.prunes.density(self.prunes_done - 1))

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out.update({"iterative/prunes_done": float(self.prunes_done),
                    "iterative/target_density": self.prunes.density(self.prunes_done - 1),
                    "iterative/last_fraction": self.last_fraction})
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["prunes_done"] = self.prunes_done
        state["last_fraction"] = self.last_fraction
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.prunes_done = int(state.get("prunes_done", 0))
        self.last_fraction = float(state.get("last_fraction", 0.0))
        if not 0 <= self.prunes_done <= self.config.prunes:
            raise ValueError(f"the saved state has {self.prunes_done} prunes done, more than sparsity.prunes="
                             f"{self.config.prunes}; resume with the config the run started with")

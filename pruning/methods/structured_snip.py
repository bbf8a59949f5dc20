"""Structured pruning at initialisation: remove whole output units (rows of a linear, filters of a conv).

Each unit is scored by the L2 norm of its SNIP saliencies |theta * dL/dtheta| over its fan-in, optionally divided
by its layer's normalised compute (2 * H_in * W_in * C_in * k^2, so expensive layers give up units first), and one
global ranking over all units decides. The budget is in weights: units are kept in score order while they fit in
round(density * N), so the kept count falls short of the target by less than one unit. Biases of removed units are
not prunable parameters and stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruning.methods.base import register_method
from pruning.methods.snip import DataScoredConfig, DataScoredPruning
from pruning.scores import input_sizes, mean_loss_gradient, scoring_mode, snip_scores, unit_compute

STRUCTURED_SCOPES = {"global": "neuron_fit"}   # one ranking over all units, a budget in weights


@dataclass
class StructuredSNIPConfig(DataScoredConfig):
    """normalise_compute: divide each unit's score by its layer's normalised compute."""

    normalise_compute: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in STRUCTURED_SCOPES:
            raise ValueError("scope must be global for structured_snip (one ranking over all units)")
        if self.iterations != 1:
            raise ValueError(f"iterations must be 1 for structured_snip (one-shot), got {self.iterations}")
        if self.selection != "exact":
            raise ValueError("selection must be exact for structured_snip (whole units fit a budget in weights; the "
                             "reference's threshold rule is for weights)")
        if self.nm is not None:
            raise ValueError("structured_snip prunes whole units, not N of every M weights; drop sparsity.nm (or use "
                             "snip with it)")


@register_method("structured_snip")
class StructuredSNIP(DataScoredPruning):
    """Whole rows / filters kept by a global threshold on the L2 norm of their SNIP saliencies."""

    Config = StructuredSNIPConfig
    config: StructuredSNIPConfig
    scope_names: ClassVar[dict[str, str]] = STRUCTURED_SCOPES

    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        """Per-weight SNIP saliency (the unit ranking is built from it in ``setup``)."""
        with scoring_mode(self.model, self.config.train_mode):
            grads = mean_loss_gradient(self.model, self.params, self.scoring_batches(),
                                       weighting=self.config.batch_weighting)
        return snip_scores(self.params, grads)

    def unit_scores(self) -> dict[str, torch.Tensor]:
        """One score per output unit of every prunable layer: the L2 norm of its saliencies (the scope's unit)."""
        units = {name: self.scope.unit_scores(name, s) for name, s in self.scores(1).items()}
        if self.config.normalise_compute:
            sample = self.scoring_batches()[0][0] if self.scoring_batches() else None
            if sample is None:
                raise ValueError("structured_snip needs at least one scoring sample on every rank to measure "
                                 "layer compute; lower the number of ranks or raise samples_per_class")
            compute = unit_compute(self.params, input_sizes(self.model, self.params, sample))
            units = {name: s / compute[name] for name, s in units.items()}
        return units

    def setup(self) -> None:
        try:
            units = self.unit_scores()
        finally:
            self._scoring = None
        self.masks.update(self.scope.select_units(units, self.config.density), optimizer=self.optimizer)
        self.check_budget(self.scope, self.config.density)

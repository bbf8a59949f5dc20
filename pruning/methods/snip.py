"""SNIP (Lee et al., 2019): keep the weights whose removal would change the loss most, |theta * dL/dtheta|.

Also the base of every data-dependent pruning-at-init scorer: a balanced set of scoring samples (``samples_per_class``
per class over all ranks, drawn from ``context.batches()`` once) regrouped into scoring batches of
``scoring_batch_size`` (256, the Synaptic Flow code's prune batch size), eval-mode scoring unless ``train_mode``.
Batches are combined as the Synaptic Flow code does (``batch_weighting: batch_mean``): the gradients of each batch's
mean loss are summed, so a short last batch counts as much as a full one; ``sample`` weights every sample the same
instead. Under several ranks each rank forms its own batches from its share of the samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pruning.methods.at_init import AtInitConfig, PruneAtInit
from pruning.methods.base import register_method
from pruning.scores import Batch, balanced_batches, mean_loss_gradient, scoring_mode, snip_scores


@dataclass
class DataScoredConfig(AtInitConfig):
    """samples_per_class: scoring samples per class over all ranks; scoring_batch_size: samples per scoring batch;
    batch_weighting: batch_mean (sum of each batch's mean-loss gradient, the reference) or sample (every sample the
    same); train_mode: score in train mode."""

    samples_per_class: int = 10
    scoring_batch_size: int = 256
    batch_weighting: Literal["batch_mean", "sample"] = "batch_mean"
    train_mode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples_per_class < 1:
            raise ValueError(f"samples_per_class must be at least 1, got {self.samples_per_class}")
        if self.scoring_batch_size < 1:
            raise ValueError(f"scoring_batch_size must be at least 1, got {self.scoring_batch_size}")


class DataScoredPruning(PruneAtInit):
    """A pruning-at-init method whose scores need labelled batches; they are collected once and reused."""

    Config = DataScoredConfig
    config: DataScoredConfig
    _scoring: list[Batch] | None = None

    def scoring_batches(self) -> list[Batch]:
        """This rank's share of the balanced scoring samples, on the model's device."""
        if self._scoring is None:
            if self.context.batches is None:
                raise ValueError(f"{self.name} scores weights with data, but no batches were given "
                                 "(MethodContext.batches); use a data-free method such as synflow")
            device = next(iter(self.params.values())).device
            self._scoring = balanced_batches(self.context.batches(), self.model, self.config.samples_per_class,
                                             self.context.rank, self.context.world_size, device,
                                             self.config.scoring_batch_size)
        return self._scoring

    def setup(self) -> None:
        try:
            super().setup()
        finally:
            self._scoring = None   # the samples are only needed while scoring


@register_method("snip")
class SNIP(DataScoredPruning):
    """|theta * dL/dtheta| with dL/dtheta summed over every scoring batch (each batch's mean loss by default, see
    the module), normalised by the sum of scores.

    The Union-Mask code's SNIP kept only the last batch's gradient (a bug); here gradients are summed over all
    batches (and all ranks), as the paper intends.
    """

    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        with scoring_mode(self.model, self.config.train_mode):
            grads = mean_loss_gradient(self.model, self.params, self.scoring_batches(),
                                       weighting=self.config.batch_weighting)
        return snip_scores(self.params, grads)

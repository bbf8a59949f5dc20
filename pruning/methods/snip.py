"""SNIP (Lee et al., 2019): keep the weights whose removal would change the loss most, |theta * dL/dtheta|.

Also the base of every data-dependent pruning-at-init scorer: a balanced set of scoring samples (``samples_per_class``
per class over all ranks, drawn from ``context.batches()`` once), eval-mode scoring unless ``train_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning.methods.at_init import AtInitConfig, PruneAtInit
from pruning.methods.base import register_method
from pruning.scores import Batch, balanced_batches, mean_loss_gradient, scoring_mode, snip_scores


@dataclass
class DataScoredConfig(AtInitConfig):
    """samples_per_class: scoring samples per class over all ranks; train_mode: score in train mode."""

    samples_per_class: int = 10
    train_mode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples_per_class < 1:
            raise ValueError(f"samples_per_class must be at least 1, got {self.samples_per_class}")


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
                                             self.context.rank, self.context.world_size, device)
        return self._scoring

    def setup(self) -> None:
        try:
            super().setup()
        finally:
            self._scoring = None   # the samples are only needed while scoring


@register_method("snip")
class SNIP(DataScoredPruning):
    """|theta * dL/dtheta| with the gradient of the mean loss over every scoring batch, normalised by its sum.

    The Union-Mask code's SNIP kept only the last batch's gradient (a bug); here gradients are summed over all
    batches (and all ranks), as the paper intends.
    """

    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        with scoring_mode(self.model, self.config.train_mode):
            grads = mean_loss_gradient(self.model, self.params, self.scoring_batches())
        return snip_scores(self.params, grads)

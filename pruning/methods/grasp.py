"""GraSP (Wang et al., 2020): keep the weights that preserve gradient flow, scored by theta * H g."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning.methods.base import register_method
from pruning.methods.snip import DataScoredConfig, DataScoredPruning
from pruning.scores import grasp_scores, hessian_gradient_product, mean_loss_gradient, scoring_mode


@dataclass
class GraSPConfig(DataScoredConfig):
    """temperature T divides the logits before the loss (200 in the paper)."""

    temperature: float = 200.0   # T: divides the logits before the loss

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


@register_method("grasp")
class GraSP(DataScoredPruning):
    """Pass 1: g = gradient of L(f / T) summed over the scoring batches (each batch's mean loss by default, as the
    reference; ``batch_weighting: sample`` for every sample the same), no graph. Pass 2: per batch, differentiate
    g . grad L (create_graph) again to accumulate H g. Score theta * H g / (|sum| + 1e-10); the lowest are pruned,
    which is the paper's "remove the largest -theta * H g" (the base class keeps the highest scores)."""

    Config = GraSPConfig
    config: GraSPConfig

    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        batches, temperature = self.scoring_batches(), self.config.temperature
        with scoring_mode(self.model, self.config.train_mode):
            weighting = self.config.batch_weighting
            g = mean_loss_gradient(self.model, self.params, batches, temperature, weighting)
            hg = hessian_gradient_product(self.model, self.params, batches, g, temperature, weighting)
        return grasp_scores(self.params, hg)

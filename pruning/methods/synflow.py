"""SynFlow (Tanaka et al., 2020): data-free scores that conserve synaptic flow, pruned iteratively.

Every state entry is replaced by its absolute value, an all-ones input of the data's shape (batch 1) goes through
the model, R is the sum of the outputs and the score is |theta * dR/dtheta|. With 100 iterations of the exponential
schedule no layer collapses until the compression where each layer can keep only one weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pruning.methods.at_init import AtInitConfig, PruneAtInit
from pruning.methods.base import MethodContext, register_method
from pruning.scores import float32_trouble, scoring_mode, synflow_scores, synflow_state

log = logging.getLogger(__name__)


@dataclass
class SynFlowConfig(AtInitConfig):
    """iterations: 100 as in the paper; precision auto: float32, and float64 when float32 under- or overflows."""

    iterations: int = 100
    train_mode: bool = False   # score in train mode (batch-norm statistics)
    precision: Literal["auto", "float32", "float64"] = "auto"


@register_method("synflow")
class SynFlow(PruneAtInit):
    """|theta * dR/dtheta| on the absolute-valued model; the model's own tensors are never modified.

    The reference code scores in float32 and silently underflows at extreme compression (R and the scores become
    0 or subnormal, and the masks follow the tie-break instead of the flow). With ``precision: auto`` a float32
    pass that under- or overflows is redone in float64 (where the device has it); if that fixes it, the remaining
    iterations stay in float64 and a warning says so. ``float64_iterations`` counts them for reports.
    """

    Config = SynFlowConfig
    config: SynFlowConfig

    def __init__(self, config: SynFlowConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.float64_iterations = 0
        self.precision_note: str | None = None
        self._use_float64 = config.precision == "float64"
        self._shape: tuple[int, ...] | None = None
        self._fixed: dict[torch.dtype, dict[str, torch.Tensor]] = {}   # |.| of what pruning leaves unchanged
        self._weights: dict[torch.dtype, dict[str, torch.Tensor]] = {}  # |theta| of the prunable weights
        self._in_setup = False

    def setup(self) -> None:
        self._in_setup = True
        try:
            super().setup()
        finally:
            self._in_setup = False
            self._fixed.clear()
            self._weights.clear()

    def flow(self, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """SynFlow scores and R in ``dtype``, reusing the absolute-valued state over iterations: masks only shrink
        during pruning at init, so |theta| of the prunable weights is kept and the newly pruned entries zeroed."""
        if dtype not in self._fixed or not self._in_setup:   # outside setup nothing is kept between calls
            self._fixed[dtype] = synflow_state(self.model, self.params, dtype)
            self._weights[dtype] = {name: p.detach().abs().to(dtype) for name, p in self.params.items()}
        else:
            with torch.no_grad():
                for name, weight in self._weights[dtype].items():
                    weight.masked_fill_(~self.masks[name], 0.0)
        return synflow_scores(self.model, self.params, self.input_shape(), dtype, self._fixed[dtype],
                              self._weights[dtype])

    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: from the context, else from the first batch of the data (read once)."""
        if self._shape is None:
            if self.context.input_shape is not None:
                self._shape = tuple(self.context.input_shape)
            elif self.context.batches is None:
                raise ValueError("synflow needs the shape of one input: set MethodContext.input_shape or give "
                                 "batches")
            else:
                inputs, _ = next(iter(self.context.batches()))
                self._shape = tuple(inputs.shape[1:])
        return self._shape

    def scores(self, iteration: int) -> dict[str, torch.Tensor]:
        with scoring_mode(self.model, self.config.train_mode):
            if not self._use_float64:
                scores, R = self.flow(torch.float32)
                keep = round(self.densities.at(iteration) * sum(p.numel() for p in self.params.values()))
                trouble = float32_trouble(scores, R, keep) if self.config.precision == "auto" else None
                if trouble is None or not self._float64_supported():
                    return scores
                wide, wide_R = self.flow(torch.float64)
                if float(wide_R) == 0.0 or not torch.isfinite(wide_R):
                    return scores   # float64 does not fix it: the network is disconnected, not underflowing
                self._use_float64 = True
                self.precision_note = (f"float32 {trouble} at iteration {iteration}; scored in float64 from there "
                                       f"(R = {float(wide_R):.3g})")
                log.warning("synflow: %s", self.precision_note)
                self.float64_iterations += 1
                return wide
            self.float64_iterations += 1
            scores, _ = self.flow(torch.float64)
            return scores

    def _float64_supported(self) -> bool:
        return next(iter(self.params.values())).device.type != "mps"

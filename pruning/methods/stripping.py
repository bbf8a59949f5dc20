"""Synaptic Stripping (ALGORITHMS.md section 4): prune the incoming weights that hold dead ReLU neurons below zero.

Every ``stripping_frequency`` epochs, after that epoch's evaluation, a decision pass over ``split`` (eval mode) sums
each neuron's ReLU output over every sample and token; a neuron is dead when its sum, added over ranks, is exactly
zero (``pruning.neurons``). For each dead neuron, the incoming weights (its row of the linear before the ReLU) that
are still non-zero are cut strictly below their **signed** ``stripping_factor`` quantile (faithful to the original:
the most negative weights, which hold the neuron below zero, go; not the smallest magnitudes). Masks accumulate
through the MaskSet (pruned weights and their optimizer state zeroed, nothing regrows), and only linears that feed a
ReLU module are touched: in a ViT the MLP linears, never attention, patch embedding or head.

The quantile is torch.quantile's default (``interpolation='linear'``) over the n non-zero kept weights v of a row,
computed by an exact sort of that row instead of torch.quantile (which refuses large inputs), step for step as
torch does it: the rank r = q * (n - 1) in the weights' dtype (q converted to that dtype first), the neighbours
v_(floor r) and v_(ceil r) of the sorted values, and the threshold torch.lerp(v_(floor r), v_(ceil r), r - floor r).
So the threshold is bit for bit torch.quantile's (tests/test_stripping.py compares them), and "strictly below" keeps
every weight equal to it (ties at the threshold survive).

No stripping after the last epoch: nothing would train the revived neurons, and the run's reported test accuracy
would not be that of the saved weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pruning.methods.base import DecisionPass, MaskedMethod, MethodConfig, RunFacts, register_method
from pruning.neurons import ReluLayer, find_relu_layers, relu_probes
from pruning.targets import prunable_parameters

SPLITS = ("train", "val", "test")


@dataclass
class StrippingConfig(MethodConfig):
    """stripping_factor: the signed quantile of a dead neuron's non-zero incoming weights below which they are cut;
    stripping_frequency: epochs between strips; split: the data the decision pass reads (``val``, a held-out part of
    the training data, by default, so test data never steers training; ``test`` as in the original work)."""

    stripping_factor: float = 0.05
    stripping_frequency: int = 1
    split: Literal["train", "val", "test"] = "val"

    def __post_init__(self) -> None:
        if not 0.0 < self.stripping_factor <= 1.0:
            raise ValueError(f"stripping_factor must be in (0, 1] (a quantile of each dead neuron's weights), "
                             f"got {self.stripping_factor}")
        if self.stripping_frequency < 1:
            raise ValueError(f"stripping_frequency must be at least 1 epoch, got {self.stripping_frequency}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    def check_run(self, run: RunFacts) -> None:
        if self.split == "val" and run.val_fraction <= 0:
            raise ValueError("sparsity.split val needs a held-out split: set data.val_fraction > 0 (e.g. 0.1), or "
                             "sparsity.split=test to decide on the test set as the original work did")
        if self.stripping_frequency >= run.epochs:
            raise ValueError(f"sparsity.stripping_frequency={self.stripping_frequency} leaves no stripping before "
                             f"the last epoch of train.epochs={run.epochs}; lower it or train longer")


def strip_rows(weight: torch.Tensor, kept: torch.Tensor, rows: torch.Tensor, factor: float) -> torch.Tensor:
    """Bool mask (weight-shaped) of the weights to cut: in each row of ``rows``, the kept non-zero weights strictly
    below their signed ``factor`` quantile (linear interpolation, exactly as torch.quantile; see the module doc)."""
    prune = torch.zeros_like(kept)
    if rows.numel() == 0:
        return prune
    values = weight.detach()[rows]
    candidates = kept[rows] & (values != 0)
    counts = candidates.sum(dim=1)
    ordered = torch.where(candidates, values, torch.full_like(values, float("inf"))).sort(dim=1).values
    rank = torch.tensor(factor, dtype=values.dtype, device=values.device) * (counts - 1).clamp_min(0)
    below = rank.long()
    above = rank.ceil().long()
    low = ordered.gather(1, below[:, None])
    high = ordered.gather(1, above[:, None])
    threshold = torch.lerp(low, high, (rank - below)[:, None])
    prune[rows] = candidates & (values < threshold)
    return prune


NO_RELU_LAYERS = ("synaptic_stripping: no prunable Linear of this model feeds an nn.ReLU module, so nothing can be "
                  "stripped; use model vit_strip (or vit / vit_s16 / vit_b16 with activation: relu)")


@register_method("synaptic_stripping")
class SynapticStripping(MaskedMethod):
    """Dead neurons found on a decision pass, their most negative incoming weights cut; masks only shrink."""

    Config = StrippingConfig
    config: StrippingConfig

    @classmethod
    def check_model(cls, config: MethodConfig, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        allowed = prunable_parameters(model, config.targets)
        if not any(f"{layer.linear}.weight" in allowed for layer in find_relu_layers(model, input_shape, "meta")):
            raise ValueError(NO_RELU_LAYERS)

    def target_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The weights of the linears that feed a ReLU module (and that ``targets`` allows)."""
        if self.context.input_shape is None:
            raise ValueError("synaptic_stripping needs the input shape to find the layers that feed a ReLU")
        allowed = prunable_parameters(model, self.config.targets)
        found = find_relu_layers(model, self.context.input_shape, self.context.device)
        self.layers: list[ReluLayer] = [layer for layer in found if f"{layer.linear}.weight" in allowed]
        self._stripped: list[tuple[int, int]] = []      # (epoch, weights cut) per stripping epoch
        self._dead: dict[str, torch.Tensor] | None = None
        self._latest = 0
        if not self.layers:   # stripping would silently do nothing: refuse
            raise ValueError(NO_RELU_LAYERS)
        return {f"{layer.linear}.weight": allowed[f"{layer.linear}.weight"] for layer in self.layers}

    def strips_after(self, epoch: int) -> bool:
        """Strip after ``epoch`` (0-based) every stripping_frequency epochs, never after the last one."""
        last = epoch + 1 >= self.context.epochs
        return (epoch + 1) % self.config.stripping_frequency == 0 and not last and bool(self.layers)

    def decision_pass(self, epoch: int) -> DecisionPass | None:
        if not self.strips_after(epoch):
            return None
        return DecisionPass(split=self.config.split, probes=relu_probes(self.layers), decide=self._decide)

    def _decide(self, sums: dict[str, torch.Tensor]) -> None:
        self._dead = {layer.linear: sums[layer.relu].reshape(-1) == 0 for layer in self.layers}

    def end_epoch(self, epoch: int) -> None:
        self._latest = 0
        if self._dead is None:
            return
        dead, self._dead = self._dead, None
        changes: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            name = f"{layer.linear}.weight"
            kept = self.masks[name]
            rows = dead[layer.linear].to(kept.device).nonzero().reshape(-1)
            prune = strip_rows(self.params[name], kept, rows, self.config.stripping_factor)
            if bool(prune.any()):
                changes[name] = kept & ~prune
        # every rank calls update (its agreement check is a collective), with or without changes
        done = self.masks.update(changes, optimizer=self.optimizer)
        self._latest = sum(change.dropped for change in done.values())
        self._stripped.append((epoch, self._latest))

    def metrics(self) -> dict[str, float]:
        """Weights cut after the latest epoch (0 when it did not strip), in all, and how many strips so far."""
        return {"stripped": float(self._latest), "stripped_total": float(sum(n for _, n in self._stripped)),
                "strips": float(len(self._stripped))}

    def state_dict(self) -> dict[str, Any]:
        return {"stripped": [list(item) for item in self._stripped]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stripped = [(int(epoch), int(count)) for epoch, count in state.get("stripped", [])]

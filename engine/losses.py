"""Training losses by name (``train.loss``): the trainer calls what the config names, never a branch on a name.

A loss is built from the train section (``build_loss``) and called as ``loss(outputs, targets)`` with integer class
targets, returning the batch mean. Evaluation builds the same loss without label smoothing and weighs each batch
by its size, so the reported test loss is the plain per-sample mean over the test set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.registry import Registry

LossFactory = Callable[[float], nn.Module]

_LOSSES: Registry[LossFactory] = Registry("training loss", "loss")


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Make a loss available as ``train.loss: <name>``; the factory takes the label smoothing."""
    return _LOSSES.register(name)


def list_losses() -> list[str]:
    return _LOSSES.names()


def check_loss(name: str) -> None:
    """A one-line error with the valid names when ``name`` is not a registered loss."""
    _LOSSES.get(name)


def build_loss(name: str, label_smoothing: float = 0.0) -> nn.Module:
    """The loss registered as ``name``, as a module returning the batch mean."""
    return _LOSSES.get(name)(label_smoothing)


@register_loss("cross_entropy")
def cross_entropy(label_smoothing: float) -> nn.Module:
    """Softmax cross entropy on logits, with optional label smoothing."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


class RateMSE(nn.Module):
    """Mean squared error between firing rates and the one-hot label (label smoothing spreads the label's mass)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, rates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        classes = rates.shape[1]
        wanted = F.one_hot(targets, classes).to(rates.dtype)
        if self.label_smoothing:
            wanted = wanted * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        return F.mse_loss(rates, wanted)


@register_loss("rate_mse")
def rate_mse(label_smoothing: float) -> nn.Module:
    """A spiking net's loss (Gradient Rewiring work): MSE between its output, the spike count of each class divided
    by the time steps, and the one-hot label, averaged over classes and samples."""
    return RateMSE(label_smoothing)

"""Theoretical FLOPs of a sparse model relative to its dense self: the figure sparse-training papers quote beside
accuracy.

Counted are the multiply-adds of matrix products and convolutions (one multiply-add = 2 FLOPs), the convention of
the RigL paper and of ``torch.utils.flop_counter``; element-wise work (activations, normalisation, softmax) is left
out. A prunable weight of density d makes its own Conv/Linear cost d times its dense cost (an unstructured sparse
kernel skips the zero weights); everything else (attention score and value products, unprunable layers) counts as
dense.

- inference: one forward pass of one sample;
- training: forward + backward with the backward costing twice the forward (gradients of the inputs and of the
  weights, each as sparse as the forward), i.e. 3x the forward per sample, averaged over the steps of the run with
  the density each step had. The occasional dense gradient of a method that grows by gradient (RigL) is not
  included.

Dense costs come from one forward of a zero sample on the meta device (the model's parameters and buffers swapped
for meta tensors for that call: no memory, no arithmetic, and attention counted through its math path whatever
kernel the real device would pick), with forward hooks on the Conv/Linear modules and ``FlopCounterMode`` for the
whole model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["DenseCosts", "dense_costs", "forward_flops", "flops_summary", "TRAINING_FACTOR"]

TRAINING_FACTOR = 3   # forward + backward, the backward counted as twice the forward


@dataclass
class DenseCosts:
    """Dense multiply-adds of one sample's forward: per weight of a Conv/Linear (by parameter name) and in total."""

    layers: dict[str, int] = field(default_factory=dict)
    total: int = 0

    @property
    def other(self) -> int:
        """Multiply-adds outside the Conv/Linear weights (attention products...), always dense."""
        return max(0, self.total - sum(self.layers.values()))


def _layer_macs(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
    """Multiply-adds of one call of a Conv/Linear module, from its input and output shapes."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        kernel = math.prod(module.kernel_size)
        return inputs[0].numel() * (module.out_channels // module.groups) * kernel
    kernel = math.prod(module.kernel_size)
    return output.numel() * (module.in_channels // module.groups) * kernel


def dense_costs(model: nn.Module, input_shape: Sequence[int], *, batch: int = 1) -> DenseCosts:
    """Dense multiply-adds per sample of ``model`` (any device) on inputs of ``input_shape`` (one sample, e.g.
    (C, H, W)); the model runs once, in eval mode on the meta device, on ``batch`` samples and is left as it was."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    meta = {name: torch.empty_like(t, device="meta")
            for name, t in [*model.named_parameters(), *model.named_buffers()]}   # tied: once, functional_call ties
    per_module: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor, name: str = name) -> None:
                per_module[name] = per_module.get(name, 0) + _layer_macs(mod, inputs, output)
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(model, meta, (torch.zeros(batch, *input_shape, device="meta"),))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers = {f"{name}.weight" if name else "weight": macs // batch for name, macs in per_module.items()}
    return DenseCosts(layers=layers, total=counter.get_total_flops() // 2 // batch)


def forward_flops(costs: DenseCosts, densities: Mapping[str, float]) -> float:
    """FLOPs of one sample's forward with each weight in ``densities`` (parameter name -> kept fraction) sparse;
    weights not named there count as dense."""
    sparse = sum(macs * float(densities.get(name, 1.0)) for name, macs in costs.layers.items())
    return 2.0 * (sparse + costs.other)


def flops_summary(costs: DenseCosts, densities: Mapping[str, float],
                  mean_forward: float | None = None) -> dict[str, Any]:
    """What summary.json and the report carry: per prunable layer and in total, dense FLOPs per sample and the
    sparse fraction of them, for inference (``densities``, the final masks) and training (3x the forward,
    ``mean_forward`` FLOPs per sample averaged over the run's steps; the final masks' forward when None)."""
    dense = 2.0 * costs.total
    inference = forward_flops(costs, densities)
    training = inference if mean_forward is None else mean_forward
    layers = {name: {"dense_flops": 2 * macs, "relative": float(densities[name])}
              for name, macs in costs.layers.items() if name in densities}
    return {"inference_flops": inference, "dense_inference_flops": dense,
            "inference_relative": inference / dense if dense else 1.0,
            "training_flops": TRAINING_FACTOR * training, "dense_training_flops": TRAINING_FACTOR * dense,
            "training_relative": training / dense if dense else 1.0, "layers": layers}

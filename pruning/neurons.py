"""Dead ReLU neurons: which linear layers feed a ReLU, how their activations are summed, and what counts as dead.

A neuron is an output feature of a ``nn.Linear`` whose output goes straight into an ``nn.ReLU`` module (in a ViT:
the MLP linears; the ReLU must be a module, not ``F.relu``, so a hook can see it). It is **dead** over a pass when
its ReLU output summed over every sample and token of the pass is exactly zero. The sums are one float vector per
layer: a hook reduces each batch's output over every dimension but the last, so no tokens x features buffer is kept.
A sum of non-negative numbers is zero exactly when every term is zero, so the test is exact in any precision (a
positive term can round a sum up, never down to zero).

The pass itself is the trainer's decision pass (``pruning.methods.base.DecisionPass`` with :func:`relu_probes`):
hooks exist only during it, and the sums are added over ranks before anyone decides, so every rank sees the same
dead neurons. Synaptic stripping decides from them; the trainer's monitor (``monitor.dead_neurons``) reports them
for any method, and the two share one hook per layer when they read the same split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ReluLayer:
    """A linear layer whose every output feature feeds a ReLU module: its neurons can die."""

    linear: str       # module name of the nn.Linear (its weight is ``<linear>.weight``)
    relu: str         # module name of the nn.ReLU that reads the linear's output
    features: int     # neurons: the linear's out_features


def find_relu_layers(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu"
                     ) -> list[ReluLayer]:
    """The linears whose output a ReLU module reads directly, found by one traced forward of one zero sample.

    The trace compares tensors by identity (the ReLU's input is the very tensor the linear returned), so it follows
    the forward pass, not the order in which modules were registered. Eval mode and no_grad: nothing is learned,
    no random number is drawn, and the model's mode is restored.
    """
    outputs: dict[str, torch.Tensor] = {}
    found: dict[str, ReluLayer] = {}
    calls: dict[str, int] = {}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}

    def keep_output(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            outputs[name] = output
        return hook

    def match_input(relu_name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            calls[relu_name] = calls.get(relu_name, 0) + 1
            for linear_name, output in outputs.items():
                if args and args[0] is output and relu_name not in found:
                    found[relu_name] = ReluLayer(linear_name, relu_name, linears[linear_name].out_features)
        return hook

    handles = [m.register_forward_hook(keep_output(n)) for n, m in linears.items()]
    handles += [m.register_forward_pre_hook(match_input(n)) for n, m in model.named_modules()
                if isinstance(m, nn.ReLU)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    reused = [name for name in found if calls[name] > 1]
    if reused:      # its hook would add up several layers' outputs as if they were one layer's neurons
        raise ValueError(f"the ReLU module {reused[0]} is applied {calls[reused[0]]} times in one forward; give each "
                         "linear its own nn.ReLU module so its neurons can be counted")
    order = {name: i for i, name in enumerate(linears)}
    return sorted(found.values(), key=lambda layer: order[layer.linear])


def relu_probes(layers: list[ReluLayer]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The probes of a decision pass over ``layers``: :func:`relu_sums` on each ReLU module (the same function
    object every time, so two passes that probe the same layer share one hook)."""
    return {layer.relu: relu_sums for layer in layers}


def relu_sums(output: torch.Tensor) -> torch.Tensor:
    """A ReLU output (..., features) summed over every dimension but the last: one value per neuron (float32 at
    least, so a half-precision pass cannot overflow a large sum to inf)."""
    dims = tuple(range(output.dim() - 1))
    dtype = torch.float32 if output.dtype in (torch.float16, torch.bfloat16) else output.dtype
    return output.sum(dim=dims, dtype=dtype)


@dataclass
class NeuronCensus:
    """Dead neurons of each ReLU layer after one pass, and the weights that still count.

    Active parameters (the stripping work's figure): the weights of the layers' live rows that a mask keeps. Rows of
    dead neurons do not count, and neither do stripped (masked) weights; biases are not counted.
    """

    dead: dict[str, torch.Tensor]           # linear name -> bool vector, True where the neuron is dead
    active: dict[str, int]                  # linear name -> kept weights in live rows
    params: dict[str, int]                  # linear name -> all weights of the layer

    def figures(self) -> dict[str, float]:
        """Scalars for TensorBoard and summary.json: totals, then dead neurons per layer."""
        values = {"dead_total": float(sum(int(d.sum()) for d in self.dead.values())),
                  "neurons_total": float(sum(d.numel() for d in self.dead.values())),
                  "active_params": float(sum(self.active.values())),
                  "params": float(sum(self.params.values()))}
        values.update({f"dead/{name}": float(int(d.sum())) for name, d in self.dead.items()})
        return values


def census(layers: list[ReluLayer], sums: Mapping[str, torch.Tensor], model: nn.Module,
           masks: Mapping[str, torch.Tensor] | None = None) -> NeuronCensus:
    """Dead neurons from a pass's reduced sums (by ReLU module name) and the active weights under ``masks``
    (by parameter name; a layer without a mask keeps every weight)."""
    dead, active, params = {}, {}, {}
    for layer in layers:
        is_dead = sums[layer.relu].reshape(-1) == 0
        weight = model.get_submodule(layer.linear).weight
        key = f"{layer.linear}.weight"
        kept = masks[key] if masks is not None and key in masks else None
        live = ~is_dead.to(weight.device)
        if kept is None:
            active[layer.linear] = int(live.sum()) * weight.shape[1]
        else:
            active[layer.linear] = int(kept[live].sum())
        dead[layer.linear] = is_dead.cpu()
        params[layer.linear] = weight.numel()
    return NeuronCensus(dead, active, params)

"""Physically remove empty units: output rows of linears and filters of convs whose weights are all zero.

Torch-Pruning's dependency graph finds every layer a unit's channel touches: the next layers' inputs, norm layers,
and whole residual groups, whose channel is removable only where every producer of it (each block's last conv, the
stem or a shortcut conv) is empty. The model's own output layer is never shrunk, nor any channel that meets a layer
mixing channels (layer norm, attention's products, concatenation): there even a constant channel matters.

An empty unit's output does not depend on the input: it is a constant (its bias, or a norm layer's shift, through
the activation). One probe forward reads that constant where the next layers receive it. Zero there: the unit goes.
Non-zero and every receiving layer is a linear, or a convolution without padding: the constant's contribution is
folded into that layer's bias (``b += W[:, j] * c``), and the unit goes. Otherwise (a padded convolution sees the
constant only inside the border, so no bias can stand in for it) the unit stays and is counted as kept. Outputs
therefore equal the masked model's up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

_LAYERS = (nn.Conv2d, nn.Linear)
_PER_CHANNEL = (*_LAYERS, nn.BatchNorm1d, nn.BatchNorm2d)   # layers that treat each channel on its own


# autograd ops (as Torch-Pruning names its element-wise nodes) that act on each channel on its own
_SAFE_OPS = ("AddBackward", "ReluBackward", "GeluBackward", "SiluBackward", "SigmoidBackward", "TanhBackward",
             "HardtanhBackward", "ClampBackward", "MeanBackward", "AvgPool", "MaxPool", "NativeBatchNormBackward",
             "CudnnBatchNormBackward", "CloneBackward", "TBackward", "AddmmBackward", "ViewBackward",
             "ReshapeAliasBackward", "UnsafeViewBackward")


def _per_channel(module: nn.Module) -> bool:
    """True for convs, linears, batch norms, reshapes and the element-wise ops above; False for anything that mixes
    channels or multiplies them by each other (layer / group norm, attention's matmuls, concatenations), where
    dropping even a constant channel changes the rest."""
    if isinstance(module, _PER_CHANNEL):
        return True
    kind = type(module).__name__
    if kind == "_ReshapeOp":
        return True
    return kind == "_ElementWiseOp" and any(op in repr(module) for op in _SAFE_OPS)


@dataclass
class GroupReport:
    """One channel group: its root layer, channels before, empty ones removed (of which folded), empty ones kept."""

    root: str
    channels: int
    removed: int
    folded: int
    kept_empty: int
    channels_removed: list[int] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.root:<28} {self.channels:5d} channels, {self.removed:5d} removed ({self.folded} folded into "
                f"the next bias), {self.kept_empty} empty kept (constant into a padded conv)")


def _channel_values(x: torch.Tensor, layer: nn.Module, channel: int) -> torch.Tensor:
    return x[:, channel] if isinstance(layer, nn.Conv2d) else x[..., channel]


def _out_channels(layer: nn.Module) -> Any:
    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


def _fold(layer: nn.Module, channel: int, value: float) -> None:
    """Add a constant input channel's contribution to ``layer``'s bias (creating a zero bias if it has none)."""
    weight = layer.weight.detach()
    column = weight[:, channel] if isinstance(layer, nn.Linear) else weight[:, channel].sum(dim=(1, 2))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    with torch.no_grad():
        layer.bias.add_(column * value)


def _foldable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1
                                            and not isinstance(layer.padding, str) and not any(layer.padding))


def compact(model: nn.Module, example: torch.Tensor) -> tuple[list[GroupReport], list[str]]:
    """Remove ``model``'s empty units in place (eval mode; see the module doc): (one report per group with empty
    units, the layers that gained a bias by folding)."""
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    inputs: dict[nn.Module, torch.Tensor] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs.setdefault(module, args[0])
        outputs.setdefault(module, out)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, _LAYERS)]
    try:
        with torch.no_grad():
            result = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    final = [m for m, out in outputs.items() if out is result]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    plans = []
    for group in graph.get_all_groups(ignored_layers=final, root_module_types=_LAYERS):
        items = list(group)
        root = items[0]
        width = len(root.idxs)
        if any(len(item.idxs) != width for item in items):     # concatenations or flattens: indices not aligned
            continue
        if any(item.dep.target.module in final and item.dep.handler == root.dep.handler for item in items):
            continue                                            # would shrink the model's output
        if not all(_per_channel(item.dep.target.module) for item in items):
            continue
        producers = [(item.dep.target.module, item.idxs) for item in items
                     if isinstance(item.dep.target.module, _LAYERS) and item.dep.handler == root.dep.handler]
        consumers = [(item.dep.target.module, item.idxs) for item in items
                     if isinstance(item.dep.target.module, _LAYERS) and item.dep.handler != root.dep.handler]
        removable, folds, kept = [], [], 0
        for position, channel in enumerate(int(i) for i in root.idxs):
            if any(bool(layer.weight[idxs[position]].any()) for layer, idxs in producers):
                continue
            constants = [(layer, idxs[position], _channel_values(inputs[layer], layer, idxs[position]))
                         for layer, idxs in consumers if layer in inputs]
            if not all(bool((v == v.reshape(-1)[0]).all()) for _, _, v in constants):
                continue                                        # not constant after all: keep it (never seen so far)
            values = [(layer, c, v.reshape(-1)[0].item()) for layer, c, v in constants]
            if all(v == 0.0 for _, _, v in values):
                removable.append(channel)
            elif all(_foldable(layer) for layer, _, _ in values):
                removable.append(channel)
                folds += values
            else:
                kept += 1
        if removable or kept:
            plans.append((root, removable, folds, kept, width))
    reports = []
    biases = {m for m in model.modules() if isinstance(m, _LAYERS) and m.bias is not None}
    for root, removable, folds, kept, width in plans:
        for layer, channel, value in folds:
            if value != 0.0:
                _fold(layer, channel, value)
        if removable:
            with torch.no_grad():
                graph.get_pruning_group(root.dep.target.module, root.dep.handler, idxs=removable).prune()
        reports.append(GroupReport(names.get(root.dep.target.module, "?"), width, len(removable),
                                   sum(1 for _, _, v in folds if v != 0.0), kept, removable))
    biased = [names[m] for m in model.modules() if isinstance(m, _LAYERS) and m.bias is not None and m not in biases]
    return reports, biased


def shrink(model: nn.Module, example: torch.Tensor, removed: dict[str, list[int]], biased: list[str]) -> nn.Module:
    """Give a freshly built ``model`` the shapes of a compacted one: ``removed`` maps each group's root layer to its
    removed output channels, ``biased`` names the layers that gained a bias by folding. Values come from a file."""
    model.eval()
    for name in biased:
        layer = model.get_submodule(name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    for name, channels in removed.items():
        layer = model.get_submodule(name)
        with torch.no_grad():
            graph.get_pruning_group(layer, _out_channels(layer), idxs=list(channels)).prune()
    return model

"""Drive a checkout of the original Synaptic Flow code (github.com/ganguli-lab/Synaptic-Flow) that a user provides.

Used by ``benchmarks/prune_at_init.py --against-reference DIR`` to time the original's pruning loop next to ours on
the same model, the same weights and the same scoring batches, and to compare the masks. Nothing of the original is
shipped here: its modules are imported from ``DIR`` (``Layers``, ``Pruners``, ``Utils``, ``Models`` and
``prune.py``, as laid out in that repository). The original's model is built from its own definition and given our
weights by position (parameters and buffers in module order, its ``*_mask`` buffers left out), which also checks
that the two architectures hold the same tensors in the same order.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

# our registered model -> (the original's module, its builder)
MODELS = {
    "vgg11": ("Models.lottery_vgg", "vgg11"), "vgg11_bn": ("Models.lottery_vgg", "vgg11_bn"),
    "vgg13": ("Models.lottery_vgg", "vgg13"), "vgg13_bn": ("Models.lottery_vgg", "vgg13_bn"),
    "vgg16": ("Models.lottery_vgg", "vgg16"), "vgg16_bn": ("Models.lottery_vgg", "vgg16_bn"),
    "vgg19": ("Models.lottery_vgg", "vgg19"), "vgg19_bn": ("Models.lottery_vgg", "vgg19_bn"),
    "resnet18": ("Models.imagenet_resnet", "resnet18"), "resnet50": ("Models.imagenet_resnet", "resnet50"),
}
PRUNERS = {"synflow": "SynFlow", "snip": "SNIP", "grasp": "GraSP", "magnitude": "Mag", "random": "Rand"}


class Reference:
    """The original code's modules, imported from a checkout."""

    def __init__(self, root: str) -> None:
        path = Path(root).expanduser().resolve()
        missing = [p for p in ("Layers/layers.py", "Pruners/pruners.py", "Utils/generator.py", "prune.py")
                   if not (path / p).is_file()]
        if missing:
            raise SystemExit(f"--against-reference {root}: not a Synaptic-Flow checkout (missing {missing[0]}); "
                             "clone github.com/ganguli-lab/Synaptic-Flow and pass its directory")
        sys.path.insert(0, str(path))
        self.pruners = importlib.import_module("Pruners.pruners")
        self.generator = importlib.import_module("Utils.generator")
        self.loop = importlib.import_module("prune")

    def model(self, name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        if name not in MODELS:
            raise SystemExit(f"no counterpart of model {name} in the original code; choose from {', '.join(MODELS)}")
        module_name, builder = MODELS[name]
        module: ModuleType = importlib.import_module(module_name)
        return getattr(module, builder)(tuple(input_shape), num_classes)

    def loaded(self, name: str, ours: nn.Module, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        """The original's model of ``name`` holding ``ours``'s weights."""
        theirs = self.model(name, input_shape, num_classes)
        copy_by_position(ours, theirs)
        return theirs

    def prune(self, method: str, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              density: float, iterations: int, device: torch.device) -> list[torch.Tensor]:
        """Run the original's ``prune_loop`` (global scope, exponential schedule); its masks in layer order."""
        pruner = getattr(self.pruners, PRUNERS[method])(self.generator.masked_parameters(model))
        self.loop.prune_loop(model, nn.CrossEntropyLoss(), pruner, batches, device, density, "exponential",
                              "global", iterations)
        return [mask.detach().bool().clone() for mask, _ in pruner.masked_parameters]


def copy_by_position(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy every parameter and buffer of ``ours`` into ``theirs`` in order, skipping the original's masks."""
    source = list(ours.state_dict().items())
    target = [(n, t) for n, t in theirs.state_dict().items() if not n.endswith("_mask")]
    if len(source) != len(target):
        raise SystemExit(f"the models differ: ours has {len(source)} tensors, the original {len(target)}")
    with torch.no_grad():
        for (ours_name, value), (their_name, slot) in zip(source, target):
            if value.shape != slot.shape:
                raise SystemExit(f"the models differ at {ours_name} {tuple(value.shape)} vs the original's "
                                 f"{their_name} {tuple(slot.shape)}")
            slot.copy_(value)


def iou(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """Intersection over union of two mask sets given in the same layer order."""
    both = sum(int(torch.count_nonzero(a & b.reshape(a.shape))) for a, b in zip(ours, theirs))
    either = sum(int(torch.count_nonzero(a | b.reshape(a.shape))) for a, b in zip(ours, theirs))
    return both / either if either else 1.0


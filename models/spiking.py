"""Spiking networks of the Gradient Rewiring work (ALGORITHMS.md section 5), built with spikingjelly, sized by the data.

Both nets use LIF neurons (tau 2, threshold 1, hard reset to 0, ATan surrogate gradient, detached reset), direct
encoding (the analogue input drives the first layer, which is computed once, outside the time loop), no biases, and
``time_steps`` (T, default 8) steps of the spiking part. The output is the spike count of each class over the T steps
divided by T, i.e. the firing rate the rate-MSE loss (``train.loss: rate_mse``) compares with the one-hot label; its
argmax is the argmax of the spike counts, so accuracy is the spike-count accuracy.

* ``spiking_mlp`` (the MNIST net): Flatten, Linear(C*H*W, 800) once, then T steps of LIF, Linear(800, classes), LIF.
* ``spiking_conv`` (the CIFAR-10 net): Conv(C, 256) + BN once, then T steps of LIF and five Conv(256) + BN + LIF
  blocks with 2x2 max-pools after the second and the fifth of them (32 -> 16 -> 8), Flatten, Dropout 0.5 (one mask
  per sample for every time step, spikingjelly's), Linear(256 * 8 * 8, 2048), LIF, Linear(2048, 10 * classes), LIF,
  then the mean of each group of 10 consecutive outputs (population voting) gives a class.

Neuron states (membrane potentials, the dropout mask) are reset at the end of every forward pass, whatever the pass
(training, evaluation, scoring), so nothing outside the model has to know it has states.

``step_mode``: "m" (spikingjelly's multi-step mode: each layer sees all T steps at once, as a [T, N, ...] tensor) or
"s" (one step at a time, a Python loop over T, as the original code). Measured by ``benchmarks/spiking.py`` on a 2-core
CPU, multi-step is 5% faster on the conv net and within noise on the MLP (docs/spiking.md), hence the default. The
two give the same network except for the batch norms of the spiking part: in multi-step mode a BN normalises over
the T * N samples of a batch at once (and updates its running statistics once per batch), in single-step mode over
the N samples of each step (T updates per batch).

spikingjelly is imported when a spiking model is built, never at import time, so importing ``models`` stays fast.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn as nn

from models.common import ModelConfigError, require_positive, set_role
from models.registry import register_model

StepMode = Literal["m", "s"]


def _spikingjelly() -> SimpleNamespace:
    """spikingjelly.activation_based's modules, imported on first use (the import takes seconds)."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    return SimpleNamespace(functional=functional, layer=layer, neuron=neuron, surrogate=surrogate)


class SpikingNet(nn.Module):
    """``static`` runs once on the input; ``dynamic`` runs for T steps on that current; spike counts are voted into
    classes and divided by T. States are reset after every forward pass.

    ``evaluation_probes`` / ``evaluation_metrics`` let the trainer measure each spiking layer's firing rate (mean spikes
    per neuron per time step) and its fraction of silent neurons on the test pass, summed over batches and ranks.
    """

    def __init__(self, static: nn.Module, dynamic: nn.Sequential, time_steps: int, vote: int,
                 step_mode: StepMode) -> None:
        super().__init__()
        sj = _spikingjelly()
        self.static = static
        self.dynamic = dynamic
        self.time_steps = time_steps
        self.vote = vote
        self.step_mode = step_mode
        sj.functional.set_step_mode(self.dynamic, step_mode)
        self._reset_net: Callable[[nn.Module], None] = sj.functional.reset_net
        self.spiking_layers = [f"dynamic.{name}" for name, module in dynamic.named_children()
                               if isinstance(module, sj.neuron.BaseNode)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            current = self.static(x)
            if self.step_mode == "m":
                spikes = self.dynamic(current.unsqueeze(0).expand(self.time_steps, *current.shape)).sum(0)
            else:
                spikes = self.dynamic(current)
                for _ in range(1, self.time_steps):
                    spikes = spikes + self.dynamic(current)
            if self.vote > 1:
                spikes = spikes.view(spikes.shape[0], -1, self.vote).mean(-1)
            return spikes / self.time_steps
        finally:
            self._reset_net(self)

    # ------------------------------------------------------------ spiking statistics on the evaluation pass
    def evaluation_probes(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Per spiking layer: its output spikes -> (spikes of each neuron summed over batch and steps, values seen)."""
        time_major = self.step_mode == "m"

        def probe(spikes: torch.Tensor) -> torch.Tensor:
            dims = (0, 1) if time_major else (0,)
            per_neuron = spikes.sum(dim=dims, dtype=torch.float64).reshape(-1)
            seen = torch.tensor([float(spikes.numel())], dtype=torch.float64, device=spikes.device)
            return torch.cat([per_neuron, seen])

        return {name: probe for name in self.spiking_layers}

    def evaluation_metrics(self, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``spikes/firing_rate/<layer>`` (spikes per neuron per time step) and ``spikes/silent/<layer>`` (fraction of
        neurons that never fired) from the probes' totals."""
        out: dict[str, float] = {}
        for name in self.spiking_layers:
            total = sums[name]
            per_neuron, seen = total[:-1], float(total[-1])
            layer = name.removeprefix("dynamic.")
            out[f"spikes/firing_rate/{layer}"] = float(per_neuron.sum()) / max(seen, 1.0)
            out[f"spikes/silent/{layer}"] = float((per_neuron == 0).double().mean())
        return out


def _lif(sj: SimpleNamespace, tau: float, v_threshold: float) -> nn.Module:
    return sj.neuron.LIFNode(tau=float(tau), v_threshold=float(v_threshold), v_reset=0.0,
                             surrogate_function=sj.surrogate.ATan(), detach_reset=True)


def _check_neuron(time_steps: int, tau: float, v_threshold: float) -> None:
    require_positive(time_steps=time_steps)
    if not tau > 1.0:
        raise ModelConfigError(f"option tau must be > 1 (the LIF membrane time constant), got {tau}")
    if not v_threshold > 0.0:
        raise ModelConfigError(f"option v_threshold must be positive, got {v_threshold}")


@register_model("spiking_mlp")
def spiking_mlp(in_channels: int, image_size: int, num_classes: int, *, hidden: int = 800, time_steps: int = 8,
                tau: float = 2.0, v_threshold: float = 1.0, step_mode: StepMode = "m") -> nn.Module:
    """The MNIST net of the Gradient Rewiring work: Linear(C*H*W, hidden) once, then T steps of LIF, Linear, LIF."""
    require_positive(hidden=hidden)
    _check_neuron(time_steps, tau, v_threshold)
    sj = _spikingjelly()
    static = nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=set_role(nn.Linear(in_channels * image_size * image_size, hidden, bias=False), "stem"),
    ))
    dynamic = nn.Sequential(OrderedDict(
        lif1=_lif(sj, tau, v_threshold),
        fc2=set_role(sj.layer.Linear(hidden, num_classes, bias=False), "classifier"),
        lif2=_lif(sj, tau, v_threshold),
    ))
    return SpikingNet(static, dynamic, time_steps, vote=1, step_mode=step_mode)


@register_model("spiking_conv")
def spiking_conv(in_channels: int, image_size: int, num_classes: int, *, width: int = 256, hidden: int = 2048,
                 vote: int = 10, dropout: float = 0.5, time_steps: int = 8, tau: float = 2.0, v_threshold: float = 1.0,
                 step_mode: StepMode = "m") -> nn.Module:
    """The CIFAR-10 net of the Gradient Rewiring work: six 3x3 conv(width) + BN blocks (the first computed once), two
    max-pools, dropout, FC hidden, FC vote * classes, population voting over groups of ``vote`` outputs."""
    require_positive(width=width, hidden=hidden, vote=vote)
    _check_neuron(time_steps, tau, v_threshold)
    if not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"option dropout must be in [0, 1), got {dropout}")
    if image_size < 4:
        raise ModelConfigError(f"spiking_conv halves the image twice; it needs images of at least 4 px, "
                               f"got {image_size}")
    sj = _spikingjelly()
    static = nn.Sequential(OrderedDict(
        conv1=set_role(nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False), "stem"),
        bn1=nn.BatchNorm2d(width),
    ))
    blocks: list[tuple[str, nn.Module]] = [("lif1", _lif(sj, tau, v_threshold))]
    for i in range(2, 7):
        blocks += [(f"conv{i}", sj.layer.Conv2d(width, width, kernel_size=3, padding=1, bias=False)),
                   (f"bn{i}", sj.layer.BatchNorm2d(width)), (f"lif{i}", _lif(sj, tau, v_threshold))]
        if i in (3, 6):     # after the second and the fifth conv of the time-stepped part
            blocks.append((f"pool{i}", sj.layer.MaxPool2d(2, 2)))
    side = image_size // 2 // 2
    blocks += [("flatten", sj.layer.Flatten()), ("dropout", sj.layer.Dropout(dropout)),
               ("fc7", sj.layer.Linear(width * side * side, hidden, bias=False)), ("lif7", _lif(sj, tau, v_threshold)),
               ("fc8", set_role(sj.layer.Linear(hidden, vote * num_classes, bias=False), "classifier")),
               ("lif8", _lif(sj, tau, v_threshold))]
    return SpikingNet(static, nn.Sequential(OrderedDict(blocks)), time_steps, vote=vote, step_mode=step_mode)

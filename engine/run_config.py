"""The whole run's config: one section per component, each owned by that component.

``load_config`` reads YAML, applies dotted overrides and builds the typed tree, so every bad key, type or value fails
in one line here, in the launcher, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

import models
from engine.backends.config import ParallelConfig
from engine.checkpoint import CheckpointConfig
from engine.config import apply_overrides, build, parse_override, read_yaml
from engine.data import DataConfig
from engine.losses import check_loss
from engine.monitor import MonitorConfig
from engine.optim import LRScheduleConfig, OptimConfig
from pruning.methods import MethodConfig, RunFacts, list_methods, method_class


@dataclass
class ModelConfig:
    """A registered model by name, with that model's own options (checked against its builder)."""

    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        models.check_model_options(self.name, self.options)


@dataclass
class TrainConfig:
    """The loop itself: length, precision, accumulation, clipping."""

    epochs: int = 10
    grad_accum_steps: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    clip_grad_norm: float | None = None
    label_smoothing: float = 0.0
    loss: str = "cross_entropy"              # a registered loss (engine.losses)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool | None = None        # None: deterministic on the CPU, fast kernels on CUDA
    max_steps_per_epoch: int | None = None   # cut epochs short (smoke runs, benchmarks)
    eval_every_epochs: int = 1
    compile: bool = False                    # torch.compile the model for the training forward (none / ddp)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be at least 1, got {self.grad_accum_steps}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or null, got {self.clip_grad_norm}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be at least 1 or null, got {self.max_steps_per_epoch}")
        if self.eval_every_epochs < 1:
            raise ValueError(f"eval_every_epochs must be at least 1, got {self.eval_every_epochs}")
        check_loss(self.loss)


@dataclass
class RunConfig:
    """Everything one training run needs; the resolved copy is saved as config.yaml in the run directory."""

    name: str = "run"
    output_dir: str = "runs"              # local path or fsspec URL; the run directory is <output_dir>/<name>
    seed: int = 0
    resume: str | None = None             # "auto" (latest in this run), a run directory, or a checkpoint file
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sparsity: MethodConfig = field(default_factory=MethodConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty run name without '/', got {self.name!r}")
        if not 0 <= self.seed < 2**63:     # torch.manual_seed takes a signed 64-bit integer
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        no_cuda = self.train.device == "cpu" or (self.train.device == "auto" and not torch.cuda.is_available())
        if self.train.precision == "fp16" and no_cuda:
            raise ValueError("train.precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
        if self.train.compile and self.parallel.backend == "deepspeed":
            raise ValueError("train.compile is not supported with parallel.backend deepspeed (its engine wraps the "
                             "module); set train.compile=false or use parallel.backend=ddp")
        if self.parallel.backend == "deepspeed" and self.parallel.zero_stage == 0 and self.train.precision != "fp32":
            raise ValueError(f"parallel.zero_stage 0 with train.precision {self.train.precision} is refused: "
                             "DeepSpeed's stage-0 mixed-precision optimizer keeps fp32 master weights that masks "
                             "cannot reach; use parallel.zero_stage=1 or 2")
        for epoch in self.lr_schedule.milestones:
            if epoch >= self.train.epochs:
                raise ValueError(f"lr_schedule.milestones has epoch {epoch} at or after train.epochs "
                                 f"({self.train.epochs}); drop it or train longer")
        self.sparsity.check_run(RunFacts(epochs=self.train.epochs, backend=self.parallel.backend,
                                         zero_stage=self.parallel.zero_stage, precision=self.train.precision,
                                         val_fraction=self.data.val_fraction, optimizer=self.optim.name))
        if self.monitor.dead_neurons == "val" and self.data.val_fraction <= 0:
            raise ValueError("monitor.dead_neurons val needs a held-out split: set data.val_fraction > 0 "
                             "(e.g. 0.1), or monitor.dead_neurons=test")
        if self.lr_schedule.warmup_epochs >= self.train.epochs:
            raise ValueError(f"lr_schedule.warmup_epochs ({self.lr_schedule.warmup_epochs}) must be shorter than "
                             f"train.epochs ({self.train.epochs})")


def switch_method(data: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """When an override names another ``sparsity.method`` than ``data``'s, keep only the sparsity keys the new
    method also has (density, targets, ...), so that it starts from its own defaults; returns the data and a line
    naming the dropped keys (None when nothing is dropped).

    Overrides apply after this, so keys given for the new method on the same command line still count."""
    switched = [value for parts, value in map(parse_override, overrides) if parts == ["sparsity", "method"]]
    section = data.get("sparsity")
    if not switched or not isinstance(section, dict):
        return data, None
    new, old = switched[-1], section.get("method", "dense")
    if new == old or not isinstance(new, str) or new not in list_methods():
        return data, None    # an unknown name fails in build, naming the valid ones
    fields = {f.name for f in dataclasses.fields(method_class(new).Config)}
    kept = {k: v for k, v in section.items() if k in fields}
    dropped = [f"sparsity.{k}" for k in section if k not in fields]
    if not dropped:
        return data, None
    shared = [f"sparsity.{k}" for k in kept if k != "method"]
    note = (f"sparsity.method={new} replaces {old}: {new} starts from its defaults, dropping {', '.join(dropped)}"
            + (f" (kept: {', '.join(shared)})" if shared else ""))
    return {**data, "sparsity": kept}, note


def load_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """YAML file (optional) + ``key=value`` overrides -> a checked RunConfig.

    ``sparsity.method=<other>`` on the command line switches methods: the file's sparsity keys that the other method
    lacks are dropped, and one line on stderr (rank 0) names them."""
    data = read_yaml(path) if path else {}
    data, note = switch_method(data, overrides)
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {note}", file=sys.stderr)
    return build(RunConfig, apply_overrides(data, overrides))

"""What the launcher's commands share: reading the launch environment, one-line failures, the config and data check.

Every command fails the same way on bad input (one line on stderr from rank 0, exit status 2) before any worker or
run starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from typing import Any

import fsspec

from engine.checkpoint import CheckpointError, load_state, resolve_resume
from engine.config import ConfigError, apply_overrides, build
from engine.data import check_data_available
from engine.run_config import RunConfig, load_config
from pruning.methods.base import SparsityMethod as MethodBase


def is_worker() -> bool:
    """True inside a torchrun / deepspeed worker (the launcher must not start workers again)."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def fail(kind: str, message: str) -> int:
    """Print ``<kind> error: <message>`` once (from rank 0) and return the exit status for bad input."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{kind} error: {message}", file=sys.stderr)
    return 2


def check(config: str | None, overrides: Sequence[str]) -> RunConfig:
    """Load and validate config and data; raises ConfigError / FileNotFoundError with one-line messages."""
    cfg = load_config(config, overrides)
    if not (cfg.data.download and is_worker()):   # workers download rank-0-first in build_loaders instead
        check_data_available(cfg.data)
    if not is_worker():
        try:
            check_model_fits(cfg)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return cfg


def check_model_fits(cfg: RunConfig) -> None:
    """What the method and the monitor need from the model's structure, checked on the meta device (no memory, no
    weights, no data): a method's ``check_model``, and ReLU-fed linears for ``monitor.dead_neurons``."""
    import torch

    from engine.build import build_model
    from engine.data import data_shape
    from pruning.methods import method_class
    from pruning.neurons import find_relu_layers

    method = method_class(cfg.sparsity.method)
    needs_relus = cfg.monitor.dead_neurons != "off"
    if method.check_model.__func__ is MethodBase.check_model.__func__ and not needs_relus:
        return   # nothing to check: no model is built
    shape = data_shape(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, shape, "meta")
    method.check_model(cfg.sparsity, model, tuple(shape.input_shape))
    if needs_relus and not find_relu_layers(model, tuple(shape.input_shape), "meta"):
        raise ValueError(f"monitor.dead_neurons={cfg.monitor.dead_neurons} but no Linear of model {cfg.model.name} "
                         "feeds an nn.ReLU module; set monitor.dead_neurons=off or use a ReLU model (vit_strip, or "
                         "vit with activation relu)")


def run_dir_of(checkpoint: str) -> str:
    """The run directory of a checkpoint under ``<run dir>/checkpoints/``, else the checkpoint's own directory."""
    parent = checkpoint.rstrip("/").rsplit("/", 1)[0]
    return parent.rsplit("/", 1)[0] if parent.endswith("/checkpoints") else parent


def load_run(path: str, overrides: list[str]) -> tuple[str, dict[str, Any], RunConfig]:
    """(checkpoint URL, its state, its config with ``overrides`` applied)."""
    if not fsspec.core.url_to_fs(path)[0].exists(fsspec.core.url_to_fs(path)[1]):
        raise FileNotFoundError(f"{path} does not exist; pass a run directory, a checkpoint directory or a "
                                "checkpoint file")
    url = resolve_resume(path, path)
    state = load_state(url, map_location="cpu")
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{url} is not a sparsetrain training checkpoint (no config or model in it)")
    return url, state, build(RunConfig, apply_overrides(state["config"], overrides))

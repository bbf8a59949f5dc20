"""What the launcher's commands share: reading the launch environment, one-line failures, the config and data check.

Every command fails the same way on bad input (one line on stderr from rank 0, exit status 2) before any worker or
run starts: the config, the data files, the model's shapes, the devices and process count, where the run writes, and
the resume target (it must be a sparsetrain checkpoint trained under the same settings). A failure inside a run is
one line too (``report_failure``), with its traceback in a log file. The table is docs/reliability.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence

from typing import Any

import fsspec

from engine.checkpoint import CheckpointError, load_state, resolve_resume
from engine.config import ConfigError, apply_overrides, build, to_dict
from engine.data import check_data_available
from engine.run_config import RunConfig, load_config
from common.urls import join_url
from engine.run_dirs import RunDirError, check_checkpoint_dir, check_resume_config, resume_target


class BadInput(Exception):
    """Input refused by a launcher check: ``kind`` (config, data, resume, run) and the one-line message for fail."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_worker() -> bool:
    """True inside a torchrun / deepspeed worker (the launcher must not start workers again)."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def fail(kind: str, message: str) -> int:
    """Print ``<kind> error: <message>`` once (from rank 0) and return the exit status for bad input."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{kind} error: {message}", file=sys.stderr)
    return 2


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0]


def read_config(config: str | None, overrides: Sequence[str]) -> RunConfig:
    """load_config, with a config path that is a directory or not text refused in one line like any bad YAML."""
    try:
        return load_config(config, overrides)
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as error:
        what = {IsADirectoryError: "a directory", UnicodeDecodeError: "not a text file"}.get(type(error),
                                                                                              "not readable")
        raise ConfigError(f"config file {config} is {what}; pass the path of a YAML file, e.g. "
                          "configs/quickstart.yaml") from None


def check(config: str | None, overrides: Sequence[str], nproc: int = 1) -> RunConfig:
    """Load and validate config, data, devices, output and resume target; raises ConfigError / FileNotFoundError /
    BadInput with one-line messages. ``nproc``: the processes the launcher is about to start."""
    cfg = read_config(config, overrides)
    if not (cfg.data.download and is_worker()):   # workers download rank-0-first in build_loaders instead
        root = os.path.abspath(os.path.expanduser(cfg.data.root))
        fresh = not os.path.exists(root)
        try:
            check_data_available(cfg.data)
        except FileNotFoundError:
            raise
        except (OSError, RuntimeError) as error:   # a download that failed: no network, a server error, a bad file
            if fresh and os.path.isdir(root):       # what the failed download created, and only that
                shutil.rmtree(root, ignore_errors=True)
            raise BadInput("data", f"data.download could not fetch {cfg.data.name} into {cfg.data.root} "
                                   f"({_first_line(error)}); check the network, or put the files there yourself"
                           ) from None
    if not is_worker():
        try:
            check_model_fits(cfg)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        check_devices(cfg, nproc)
        check_output(cfg)
    return cfg


def check_devices(cfg: RunConfig, nproc: int) -> None:
    """What this machine and the process count allow: CUDA asked for and absent, NCCL without GPUs, backend none
    with several processes."""
    import torch

    if nproc < 1:
        raise BadInput("config", f"--nproc-per-node must be at least 1, got {nproc}")
    cuda = torch.cuda.is_available()
    if cfg.train.device == "cuda" and not cuda:
        raise BadInput("config", "train.device is cuda but no CUDA device is visible; set train.device=cpu or auto")
    if cfg.parallel.dist_backend == "nccl" and (not cuda or cfg.train.device == "cpu"):
        raise BadInput("config", "parallel.dist_backend nccl needs CUDA devices, and this run trains on the CPU; "
                                 "set parallel.dist_backend=gloo or auto")
    if cfg.parallel.backend == "none" and nproc > 1:
        raise BadInput("config", f"parallel.backend none trains in one process, but --nproc-per-node {nproc} asks "
                                 "for more; set parallel.backend=ddp (or auto), or drop --nproc-per-node")


def check_writable(url: str, key: str) -> None:
    """A known fsspec protocol whose package is installed; locally, a path not under a file and writable (probed
    with an unnamed temporary file, so nothing is left behind)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as error:
        raise BadInput("config", f"{key} {url}: {_first_line(error)}; install it, or use a local path") from None
    except ValueError as error:
        raise BadInput("config", f"{key} {url}: {_first_line(error)}; use a local path or an fsspec URL such as "
                                 "s3://bucket/runs") from None
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"lies under the file {existing}"
        raise BadInput("config", f"{key} {url} {where}; choose a directory path")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise BadInput("config", f"{key} {url} is not writable ({existing}: {error.strerror}); choose a directory "
                                 "you can write to") from None


def check_output(cfg: RunConfig) -> None:
    """output_dir and checkpoint.dir can be written; a fresh run's checkpoint.dir belongs to no other run; a resume
    target exists, is a sparsetrain checkpoint and was trained under the same settings (engine/run_dirs.py)."""
    check_writable(cfg.output_dir, "output_dir")
    if cfg.checkpoint.dir:
        check_writable(cfg.checkpoint.dir, "checkpoint.dir")
    try:
        if cfg.resume is None:
            if cfg.checkpoint.dir:
                check_checkpoint_dir(cfg.checkpoint.dir, None, None)
            return
        url, run_dir = _resume_target(cfg)
        if url is None:
            return
        state = _load_checkpoint(url)
        check_resume_config(url, state["config"], to_dict(cfg))
        if run_dir is not None:
            check_checkpoint_dir(cfg.checkpoint.dir or join_url(run_dir, "checkpoints"), run_dir, url)
    except RunDirError as error:
        raise BadInput("resume" if cfg.resume else "run", str(error).removeprefix("resume: ")) from None


def _resume_target(cfg: RunConfig) -> tuple[str | None, str | None]:
    try:
        # quietly: the run itself resolves the target again and says which damaged checkpoints it skips, once
        return resume_target(cfg.resume, cfg.output_dir, cfg.name, cfg.checkpoint.dir, note=lambda line: None)
    except FileNotFoundError as error:
        raise BadInput("resume", str(error).removeprefix("resume: ")) from None
    except (ValueError, ImportError, OSError) as error:
        raise BadInput("resume", f"{cfg.resume}: {_first_line(error)}; pass a checkpoint file, a checkpoint "
                                 "directory, a run directory or 'auto'") from None


def _load_checkpoint(url: str) -> dict[str, Any]:
    """A training checkpoint's state, or a one-line BadInput saying what the file is instead."""
    from engine.trainer import CHECKPOINT_FORMAT

    try:
        state = load_state(url, map_location="cpu", note=lambda line: None)   # the run's own load notes it
    except CheckpointError as error:
        raise BadInput("resume", f"{error}; pass another checkpoint, or start afresh without resume") from None
    except Exception as error:   # torch's reader fails on foreign files in many ways
        raise BadInput("resume", f"{url} is not a sparsetrain checkpoint ({type(error).__name__}: "
                                 f"{_first_line(error)}); pass another checkpoint, or start afresh without resume"
                       ) from None
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("config"), dict):
        raise BadInput("resume", f"{url} is not a sparsetrain training checkpoint (format {state.get('format')!r}); "
                                 "pass a checkpoint written by `launcher train`")
    return state


def finished_run(cfg: RunConfig) -> str | None:
    """The run directory when cfg.resume points at a run that already trained cfg.train.epochs and wrote its
    summary.json: resuming it has nothing to do, and its record must not be rewritten."""
    if cfg.resume is None:
        return None
    url, run_dir = _resume_target(cfg)
    if url is None or run_dir is None:
        return None
    fs, path = fsspec.core.url_to_fs(join_url(run_dir, "summary.json"))
    if not fs.exists(path):
        return None
    return run_dir if int(_load_checkpoint(url)["epoch"]) >= cfg.train.epochs else None


def report_failure(error: BaseException, cfg: RunConfig | None) -> int:
    """A failure inside a run, on one line from the first rank that hits it; returns the exit status.

    engine.errors' RunStopped prints its own message with its exit code; bad input found only inside the run
    (ConfigError, RunDirError, missing data) is exit 2 as before a start; anything else prints its type and first
    line, exit 1, and the full traceback goes to ``<run dir>/logs/rank<N>.log`` (a temporary file when the run
    directory was not claimed yet).
    """
    from engine.errors import RunStopped

    if isinstance(error, RunStopped):
        code, line = error.exit_code, str(error)
    elif isinstance(error, (ConfigError, RunDirError, BadInput)):
        code, line = 2, f"{getattr(error, 'kind', 'config')} error: {_first_line(error)}"
    elif isinstance(error, FileNotFoundError):
        code, line = 2, f"data error: {_first_line(error)}"
    else:
        log = _write_traceback(error, getattr(error, "run_dir", None), cfg)
        code, line = 1, f"error: {type(error).__name__}: {_first_line(error)} (full traceback: {log})"
    if _first_to_report():
        print(line, file=sys.stderr, flush=True)
    return code


def _write_traceback(error: BaseException, run_dir: str | None, cfg: RunConfig | None) -> str:
    rank = int(os.environ.get("RANK", "0"))
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if run_dir:
        url = join_url(run_dir, f"logs/rank{rank}.log")
        try:
            fs, path = fsspec.core.url_to_fs(url)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "w") as handle:
                handle.write(text)
            return url
        except Exception:   # the log must never hide the error itself
            pass
    handle, path = tempfile.mkstemp(prefix=f"sparsetrain-rank{rank}-", suffix=".log")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    return path


def _first_to_report() -> bool:
    """True in a single process, and in the first worker of this torchrun attempt on this machine to fail: it
    creates a marker exclusively in the temporary directory, keyed by torchrun's run id and restart count. Without
    a collective (a failing rank cannot rely on one), each machine of a multi-node job prints its own line."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    key = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    marker = os.path.join(tempfile.gettempdir(), f"sparsetrain-failed-{key}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError:
        return int(os.environ.get("RANK", "0")) == 0
    return True


def check_model_fits(cfg: RunConfig) -> None:
    """What the method and the monitor need from the model's structure, checked on the meta device (no memory, no
    weights, no data): the model's own options, a method's ``check_model``, and ReLU-fed linears for
    ``monitor.dead_neurons``."""
    import torch

    from engine.build import build_model
    from engine.data import data_shape
    from pruning.methods import method_class
    from pruning.neurons import find_relu_layers

    method = method_class(cfg.sparsity.method)
    needs_relus = cfg.monitor.dead_neurons != "off"
    shape = data_shape(cfg.data)   # the model is always built: widths and sizes are checked there
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

"""The Tune function trainable: one trial is one ``engine.trainer.train`` run in its own run directory.

Each epoch's metrics go to Tune from the engine's callback, with a Tune checkpoint that is a pointer (run directory,
epoch) into the run-directory contract: the engine writes ``<run_dir>/checkpoints/ckpt-e<epoch>-s<step>.pt`` right
after the callbacks of that epoch, so the Tune checkpoint stays a few bytes and the weights are written once.

Restoring (a resumed sweep, a retried trial) reads the pointer: the trial's own run directory resumes from that
epoch's file; a pointer into another trial's directory has that file copied into this trial's checkpoints/ first, so
the trial continues in its own directory with its own config. (PBT, whose exploit restores the epoch just reported,
before the engine has written it, is refused in tune/spec.py.) Each restore is
logged in ``<run_dir>/tune_restores.jsonl``.

A pointer is reported just before the engine writes its file; if a trial dies in between, the restore falls back to
the newest earlier file (that trial then repeats an epoch Tune has already counted).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import fsspec

from tune.spec import SweepPlan

POINTER = "sparsetrain_pointer.json"
_CKPT = re.compile(r"^ckpt-e(\d{4,})-s(\d{8,})\.pt$")


def _checkpoint_files(run_dir: str) -> list[tuple[int, str]]:
    """(epoch, URL) of the engine's checkpoint files in a run directory, oldest first."""
    fs, path = fsspec.core.url_to_fs(f"{run_dir.rstrip('/')}/checkpoints")
    try:
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), int(m.group(2)), n) for n in names if (m := _CKPT.match(n))]
    return [(e, f"{run_dir.rstrip('/')}/checkpoints/{n}") for e, _, n in sorted(found)]


def checkpoint_at(run_dir: str, epoch: int) -> str | None:
    """The engine's checkpoint of ``epoch`` in ``run_dir``, else the newest one before it (None: nothing usable)."""
    usable = [url for e, url in _checkpoint_files(run_dir) if e <= epoch]
    return usable[-1] if usable else None


def _remove_checkpoints(run_dir: str) -> None:
    fs, _ = fsspec.core.url_to_fs(run_dir)
    for _, url in _checkpoint_files(run_dir):
        fs.rm(fsspec.core.url_to_fs(url)[1])


def resume_point(own_run_dir: str, pointer: Mapping[str, Any]) -> str | None:
    """The checkpoint file this trial resumes from, placed in its own run directory (None: start fresh)."""
    source = checkpoint_at(str(pointer["run_dir"]), int(pointer["epoch"]))
    if source is None or pointer["run_dir"].rstrip("/") == own_run_dir.rstrip("/"):
        return source
    _remove_checkpoints(own_run_dir)                     # another trial's weights: this trial's files are stale
    fs, _ = fsspec.core.url_to_fs(own_run_dir)
    target = f"{own_run_dir.rstrip('/')}/checkpoints/{source.rsplit('/', 1)[-1]}"
    fs.makedirs(fsspec.core.url_to_fs(target.rsplit("/", 1)[0])[1], exist_ok=True)
    with fsspec.open(source, "rb") as src, fsspec.open(target, "wb") as dst:
        dst.write(src.read())
    return target


def _append_line(url: str, line: str) -> None:
    """Append one line (read and rewrite: object stores have no append)."""
    fs, path = fsspec.core.url_to_fs(url)
    before = fs.cat_file(path).decode() if fs.exists(path) else ""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as handle:
        handle.write(before + line + "\n")


class TuneReporter:
    """Engine callback: report the epoch's metrics to Tune, with a pointer checkpoint when the engine saves one."""

    def __init__(self, run_dir: str, epochs: int, every_epochs: int, save_final: bool) -> None:
        self.run_dir, self.epochs, self.every, self.save_final = run_dir, epochs, every_epochs, save_final

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        from ray import tune

        done = epoch + 1
        values = {k: float(v) for k, v in metrics.items()}
        saves = done % self.every == 0 or (done == self.epochs and self.save_final)
        if not saves:
            tune.report(values)
            return False
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, POINTER), "w") as handle:
                json.dump({"run_dir": self.run_dir, "epoch": done}, handle)
            tune.report(values, checkpoint=tune.Checkpoint.from_directory(folder))
        return False


def run_trial(config: dict[str, Any], plan: SweepPlan) -> None:
    """One trial: the run config from the drawn values, resumed from Tune's checkpoint if it hands one over."""
    import torch
    from ray import tune

    from engine.trainer import train

    torch.set_num_threads(max(1, int(plan.sweep.resources.cpus)))
    name = f"trial_{tune.get_context().get_trial_id()}"
    own_dir = f"{plan.trials_dir}/{name}"
    resume = "auto"                       # a fresh trial: exactly <trials_dir>/<name>, no -2 suffix
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:                # Tune's count starts at 0: files of an earlier attempt it never saw go
        _remove_checkpoints(own_dir)
    else:
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, POINTER)) as handle:
                pointer = json.load(handle)
        found = resume_point(own_dir, pointer)
        if found is None:                 # nothing at or before that epoch survives: start over, cleanly
            _remove_checkpoints(own_dir)
        resume = found or "auto"
        # a record of every restore, next to the run's files: which Tune checkpoint, which engine file
        _append_line(f"{own_dir}/tune_restores.jsonl", json.dumps({"pointer": pointer, "resume": resume}))
    cfg = plan.trial_config(config, name=name, resume=resume)
    reporter = TuneReporter(own_dir, cfg.train.epochs, cfg.checkpoint.every_epochs, cfg.checkpoint.save_final)
    train(cfg, callbacks=[reporter])

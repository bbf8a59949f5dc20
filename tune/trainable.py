"""The Tune function trainable: one trial is one ``engine.trainer.train`` run in its own run directory.

Each epoch's metrics go to Tune from the engine's callback, with a Tune checkpoint that is a pointer (run directory,
epoch) into the run-directory contract: the reporter sends it from ``after_checkpoint``, which the engine calls once
``<run_dir>/checkpoints/ckpt-e<epoch>-s<step>.pt`` is written, so the file a pointer names always exists, the Tune
checkpoint stays a few bytes and the weights are written once.

Restoring (a resumed sweep, a retried trial, a PBT exploit) reads the pointer: the trial's own run directory resumes
from that epoch's file; a pointer into another trial's directory (PBT) has that file brought into this trial's
checkpoints/ first, with the hyper-parameters PBT may change (``PBT_MUTABLE``) set to this trial's values, so the
trial continues in its own directory with its own config. Each restore is logged in ``<run_dir>/tune_restores.jsonl``.

With ``resources.workers_per_trial > 1`` the trial is the driver of a Ray Train ``TorchTrainer`` (Train V2): its
workers run the engine as one DDP job in the process group Ray made, rank 0 hands each epoch's metrics and pointer
to the trial through a queue, and the trial reports them to Tune.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

import fsspec

from tune.spec import PBT_MUTABLE, SweepPlan, get_dotted, set_dotted

POINTER = "sparsetrain_pointer.json"
_CKPT = re.compile(r"^ckpt-e(\d{4,})-s(\d{8,})\.pt$")

Send = Callable[[dict[str, float], "dict[str, Any] | None"], None]


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
    """Remove the engine's checkpoint files of a run directory, with their checksum files."""
    from engine.checkpoint import META_SUFFIX

    fs, _ = fsspec.core.url_to_fs(run_dir)
    for _, url in _checkpoint_files(run_dir):
        for path in (url, url + META_SUFFIX):
            if fs.exists(fsspec.core.url_to_fs(path)[1]):
                fs.rm(fsspec.core.url_to_fs(path)[1])


def resume_point(own_run_dir: str, pointer: Mapping[str, Any],
                 run: Mapping[str, Any] | None = None) -> tuple[str | None, dict[str, list[Any]]]:
    """(the checkpoint file this trial resumes from, placed in its own run directory, or None: start fresh; the
    PBT-mutable keys changed on the way).

    A pointer into another trial's directory (a PBT exploit) has that checkpoint loaded (which verifies it), its
    PBT-mutable hyper-parameters set to ``run``'s (a plain run config) and saved into this trial's checkpoints/.
    """
    from engine.checkpoint import load_state, save_state

    source = checkpoint_at(str(pointer["run_dir"]), int(pointer["epoch"]))
    if source is None or pointer["run_dir"].rstrip("/") == own_run_dir.rstrip("/"):
        return source, {}
    _remove_checkpoints(own_run_dir)                     # another trial's weights: this trial's files are stale
    state = load_state(source)
    changed = carry_mutations(state, run) if run is not None else {}
    target = f"{own_run_dir.rstrip('/')}/checkpoints/{source.rsplit('/', 1)[-1]}"
    save_state(target, state)
    return target, changed


def carry_mutations(state: dict[str, Any], run: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Set the PBT-mutable hyper-parameters of a checkpoint's state to those of ``run`` (a plain run config).

    The engine restores the lr schedule's base lrs from the checkpoint, so a new peak lr rescales them (warm-up and
    decay continue where they were); the other keys are read from the config as the run goes. The checkpoint's config
    records the new values, so a resume sees the config it continues under. Returns {key: [old, new]} changed.
    """
    saved = state.get("config")
    if not isinstance(saved, dict):
        return {}
    changed: dict[str, list[Any]] = {}
    for key in PBT_MUTABLE:
        old, new = get_dotted(saved, key), get_dotted(run, key)
        if new is None or old == new:
            continue
        if key == "optim.lr":
            if not old:
                continue
            schedule = state["lr_schedule"]
            schedule["base_lrs"] = [float(b) * float(new) / float(old) for b in schedule["base_lrs"]]
        set_dotted(saved, key, new)
        changed[key] = [old, new]
    return changed


def _append_line(url: str, line: str) -> None:
    """Append one line (read and rewrite: object stores have no append)."""
    fs, path = fsspec.core.url_to_fs(url)
    before = fs.cat_file(path).decode() if fs.exists(path) else ""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as handle:
        handle.write(before + line + "\n")


def report_to_tune(metrics: dict[str, float], pointer: dict[str, Any] | None) -> None:
    """``tune.report`` with the pointer, when there is one, as a Tune checkpoint of a few bytes."""
    from ray import tune

    if pointer is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, POINTER), "w") as handle:
            json.dump(pointer, handle)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class TuneReporter:
    """Engine callback: each epoch's metrics, with a pointer to the epoch's checkpoint file when the engine wrote one.

    Nothing is sent from ``on_epoch_end``: the report waits for ``after_checkpoint``, so Tune (and a PBT exploit)
    never holds a pointer to a file that is not there yet.
    """

    def __init__(self, run_dir: str, send: Send = report_to_tune) -> None:
        self.run_dir, self.send = run_dir, send
        self.pending: dict[str, float] | None = None

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        self.pending = {k: float(v) for k, v in metrics.items()}
        return False                      # Tune's scheduler stops a trial from outside; nothing to decide here

    def after_checkpoint(self, epoch: int, url: str | None) -> None:
        values, self.pending = self.pending, None
        if values is None:
            return
        self.send(values, None if url is None else {"run_dir": self.run_dir, "epoch": epoch + 1})


def _restore(own_dir: str, run: Mapping[str, Any]) -> str:
    """The ``resume`` setting of this trial from Tune's checkpoint (a fresh start: ``auto`` in a cleaned directory)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:                # Tune's count starts at 0: files of an earlier attempt it never saw go
        _remove_checkpoints(own_dir)
        return "auto"
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, POINTER)) as handle:
            pointer = json.load(handle)
    found, changed = resume_point(own_dir, pointer, run)
    if found is None:                     # nothing at or before that epoch survives: start over, cleanly
        _remove_checkpoints(own_dir)
    # a record of every restore, next to the run's files: which Tune checkpoint, which engine file, what changed
    _append_line(f"{own_dir}/tune_restores.jsonl",
                 json.dumps({"pointer": pointer, "resume": found or "auto", "changed": changed}))
    return found or "auto"


def run_trial(config: dict[str, Any], plan: SweepPlan) -> None:
    """One trial: the run config from the drawn values, resumed from Tune's checkpoint if it hands one over."""
    from ray import tune

    name = f"trial_{tune.get_context().get_trial_id()}"
    own_dir = f"{plan.trials_dir}/{name}"
    resume = _restore(own_dir, plan.run_data(config))
    cfg = plan.trial_config(config, name=name, resume=resume)
    if plan.sweep.resources.workers_per_trial > 1:
        _run_train_job(plan, cfg, own_dir)
        return
    import torch

    from engine.trainer import train

    torch.set_num_threads(max(1, int(plan.sweep.resources.cpus)))
    train(cfg, callbacks=[TuneReporter(own_dir)])


# ------------------------------------------------------------------------------- multi-worker trials (Ray Train V2)
class _QueueSend:
    """Rank 0's sender: the epoch's report goes to the trial through a Ray queue (the trial reports it to Tune)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, metrics: dict[str, float], pointer: dict[str, Any] | None) -> None:
        self.queue.put((metrics, pointer))


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the engine in the process group Ray made (it joins it and leaves it standing)."""
    import ray.train
    import torch

    from engine.config import build
    from engine.run_config import RunConfig
    from engine.trainer import train

    torch.set_num_threads(max(1, int(loop_config["threads"])))
    cfg = build(RunConfig, loop_config["run"])
    rank = ray.train.get_context().get_world_rank()
    callbacks = [TuneReporter(loop_config["run_dir"], send=_QueueSend(loop_config["queue"]))] if rank == 0 else []
    train(cfg, callbacks=callbacks)


def _run_train_job(plan: SweepPlan, cfg: Any, own_dir: str) -> None:
    """Drive a TorchTrainer of ``workers_per_trial`` workers; pass rank 0's reports to Tune as they come."""
    import uuid

    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from engine.backends.ddp import dist_backend_name
    from engine.config import to_dict

    resources = plan.sweep.resources
    gpu = resources.gpus > 0
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})    # maxsize 1: rank 0 waits until Tune took a report
    worker_resources = {"CPU": resources.cpus, **({"GPU": resources.gpus} if gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"run": to_dict(cfg), "run_dir": own_dir, "queue": queue, "threads": resources.cpus},
        torch_config=TorchConfig(backend=dist_backend_name(cfg.parallel, torch.device("cuda" if gpu else "cpu"))),
        scaling_config=ScalingConfig(num_workers=resources.workers_per_trial, use_gpu=gpu,
                                     resources_per_worker=worker_resources),
        # Train's own state, one folder per attempt: a restarted trial resumes through the engine's checkpoint
        run_config=RunConfig(name=f"attempt_{uuid.uuid4().hex[:8]}", storage_path=f"{own_dir}/ray_train",
                             failure_config=FailureConfig(max_failures=0)))
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:    # re-raised in the trial's thread below
            failure.append(error)

    runner = threading.Thread(target=fit, name="ray-train-driver", daemon=True)
    runner.start()
    while True:
        try:
            metrics, pointer = queue.get(timeout=0.5)
        except Empty:
            if not runner.is_alive() and queue.empty():
                break
            continue
        report_to_tune(metrics, pointer)
    runner.join()
    if failure:
        raise failure[0]

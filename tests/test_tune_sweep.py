"""Sweeps through Ray Tune end to end on digits (2 local Ray CPUs): ASHA to completion, a killed driver resumed, a PBT
exploit, and a trial that is a 2-worker Ray Train DDP job."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

BASE = {"model": {"name": "mlp", "options": {"hidden": [32]}},
        "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.1},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "train": {"epochs": 3, "device": "cpu"},
        "sparsity": {"method": "set", "density": 0.1, "distribution": "erk", "period": 10}}


def _write(tmp_path: Path, **fields: object) -> str:
    data = {"name": "s", "base": BASE, "sweep_dir": str(tmp_path / "sweeps"), "ray": {"num_cpus": 2},
            "resources": {"cpus": 1}}
    data.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher", "tune", *args, "--verbose", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _rows(experiment: Path) -> list[dict[str, str]]:
    with open(experiment / "trials.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_asha_sweep_of_four_trials_to_completion(tmp_path: Path) -> None:
    # densities far apart: the sparse trials trail at the first rung, so ASHA stops at least one of them
    path = _write(tmp_path, space={"sparsity.density": {"grid": [0.5, 0.3, 0.02, 0.01]}}, max_concurrent=2,
                  scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    done = _launch(path)
    output, _ = done.communicate(timeout=500)
    assert done.returncode == 0, output[-3000:]
    experiment = tmp_path / "sweeps" / "s"
    rows = _rows(experiment)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert sorted(float(r["sparsity.density"]) for r in rows) == [0.01, 0.02, 0.3, 0.5]
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped and all(int(r["epochs"]) < 3 for r in stopped)
    for row in rows:
        assert abs(float(row["density"]) - float(row["sparsity.density"])) < 0.01
        trial = experiment / "trials" / row["trial"]
        assert list((trial / "tensorboard").glob("events.out.tfevents.*"))
        if row["stopped_early"] == "False":
            summary = json.loads((trial / "summary.json").read_text())
            assert summary["epochs"] == 3 and summary["val_acc"] == pytest.approx(float(row["val_acc"]))
    assert "best trial" in output and (experiment / "sweep.png").stat().st_size > 1000
    best = yaml.safe_load((experiment / "best_config.yaml").read_text())
    finished = [r for r in rows if r["stopped_early"] == "False"]
    assert best["sparsity"]["density"] == float(max(finished, key=lambda r: float(r["val_acc"]))["sparsity.density"])

    from engine.run_config import load_config
    from engine.trainer import train

    cfg = load_config(str(experiment / "best_config.yaml"), [f"output_dir={tmp_path / 'runs'}", "train.epochs=1",
                                                             "monitor.progress=false"])
    assert train(cfg)["epochs"] == 1


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit():
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (the local Ray it launched), by their ids."""
    for pid in [process.pid, *_descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)


def _saved_with_a_checkpoint(experiment: Path, trial: str) -> bool:
    """Tune has a checkpoint of ``trial`` and saved its sweep state (the state a restore reads) well after it reached
    storage (Tune keeps the newest two; the state is saved within a second of each report)."""
    states = list(experiment.glob("experiment_state-*.json"))
    saved = [c.stat().st_mtime for c in experiment.glob(f"run_{trial}_*/checkpoint_*")]
    return bool(states and saved) and max(s.stat().st_mtime for s in states) > min(saved) + 0.3


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    # one trial at a time, a small conv net (0.5-3 s an epoch): the driver dies inside the second trial once
    # Tune has saved its state with a checkpoint of that trial (a fixed sleep raced the end of MLP trials that ran all
    # their epochs within it, so the "interrupted" trial had in fact finished)
    base = {**BASE, "model": {"name": "conv", "options": {"width": 16}},
            "data": {**BASE["data"], "batch_size": 8}, "train": {"epochs": 12, "device": "cpu"}}
    path = _write(tmp_path, base=base, space={"sparsity.density": {"grid": [0.3, 0.2, 0.1]}}, max_concurrent=1,
                  scheduler={"name": "fifo"})
    experiment = tmp_path / "sweeps" / "s"
    trials = experiment / "trials"
    driver = _launch(path)
    finished: list[Path] = []
    running: list[Path] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and driver.poll() is None:
            dirs = sorted(trials.glob("trial_*")) if trials.exists() else []
            finished = [d for d in dirs if (d / "summary.json").exists()]
            running = [d for d in dirs if not (d / "summary.json").exists()
                       and _saved_with_a_checkpoint(experiment, d.name)]
            if finished and running:
                break
            time.sleep(0.05)
        assert finished and running and driver.poll() is None, "the sweep ended before it could be killed mid-way"
    finally:
        _kill_tree(driver)
    first_summaries = {d.name: (d / "summary.json").stat().st_mtime_ns for d in finished}
    assert len(first_summaries) < 3
    assert not (running[0] / "summary.json").exists(), "the trial finished before the kill: nothing to resume"

    resumed = _launch(path, "resume=true")
    output, _ = resumed.communicate(timeout=500)
    assert resumed.returncode == 0, output[-3000:]
    rows = _rows(tmp_path / "sweeps" / "s")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"} and {r["epochs"] for r in rows} == {"12"}
    for name, mtime in first_summaries.items():        # finished before the kill: not run again
        assert (trials / name / "summary.json").stat().st_mtime_ns == mtime
        assert not (trials / name / "tune_restores.jsonl").exists()
    restored = [d for d in trials.glob("trial_*") if (d / "tune_restores.jsonl").exists()]
    assert restored, "the interrupted trial started over instead of resuming from its checkpoint"
    for trial in restored:
        record = json.loads((trial / "tune_restores.jsonl").read_text().splitlines()[0])
        assert record["pointer"]["run_dir"] == str(trial) and record["pointer"]["epoch"] >= 1
        assert record["resume"].startswith(str(trial / "checkpoints" / "ckpt-e"))
        assert json.loads((trial / "summary.json").read_text())["epochs"] == 12
        epochs = [int(m["epoch"]) for m in _metrics(trial)]
        assert set(epochs) == set(range(1, 13)) and epochs.count(1) == 1            # it did not start over


def _metrics(trial: Path) -> list[dict[str, str]]:
    with open(trial / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_pbt_exploit_continues_from_the_donors_epoch_with_the_new_lr(tmp_path: Path) -> None:
    # two trials, a perturbation after every epoch, synchronous: the worse trial is exploited at epochs 1 and 2
    base = {**BASE, "lr_schedule": {"name": "constant"}}
    path = _write(tmp_path, base=base, space={"optim.lr": {"loguniform": [0.001, 0.5]}}, num_samples=2,
                  scheduler={"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5,
                             "resample_probability": 0.0, "synch": True})
    done = _launch(path)
    output, _ = done.communicate(timeout=500)
    assert done.returncode == 0, output[-3000:]
    experiment = tmp_path / "sweeps" / "s"
    rows = _rows(experiment)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"} and {r["epochs"] for r in rows} == {"3"}
    assert len({r["trial"] for r in rows}) == 2
    exploits = []
    for row in rows:
        trial = experiment / "trials" / row["trial"]
        epochs = [int(m["epoch"]) for m in _metrics(trial)]
        assert epochs == [1, 2, 3], f"{trial.name} looped or skipped epochs: {epochs}"
        assert json.loads((trial / "summary.json").read_text())["epochs"] == 3
        for line in (trial / "tune_restores.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["pointer"]["run_dir"] != str(trial):
                exploits.append((trial, record))
    assert exploits, "PBT never exploited a trial"
    for trial, record in exploits:
        epoch = record["pointer"]["epoch"]
        assert record["resume"] == str(trial / "checkpoints" / Path(record["resume"]).name)
        assert Path(record["resume"]).name.startswith(f"ckpt-e{epoch:04d}-")
        old, new = record["changed"]["optim.lr"]
        # PBT's 0.8 / 1.2 factors, clipped by Ray to the search space's bounds [0.001, 0.5]
        assert old != new and new in (pytest.approx(max(0.8 * old, 0.001)), pytest.approx(min(1.2 * old, 0.5)))
        # the next epoch trained with the mutated lr (constant schedule: the logged lr is the config's)
        logged = {int(m["epoch"]): float(m["lr"]) for m in _metrics(trial)}
        assert logged[epoch + 1] == pytest.approx(new)


@pytest.mark.slow
def test_multi_worker_trial_is_a_ray_train_ddp_job(tmp_path: Path) -> None:
    # one trial of two gloo workers (1 CPU each) driven by Ray Train V2 inside the Tune trial
    base = {**BASE, "train": {"epochs": 2, "device": "cpu"}, "sparsity": {**BASE["sparsity"], "period": 5}}
    path = _write(tmp_path, base=base, space={"sparsity.drop_fraction": {"choice": [0.3]}},
                  scheduler={"name": "fifo"}, resources={"cpus": 1, "workers_per_trial": 2})
    done = _launch(path)
    output, _ = done.communicate(timeout=500)
    assert done.returncode == 0, output[-3000:]
    experiment = tmp_path / "sweeps" / "s"
    rows = _rows(experiment)
    assert len(rows) == 1 and rows[0]["status"] == "done" and rows[0]["epochs"] == "2"
    trial = experiment / "trials" / rows[0]["trial"]
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert float(rows[0]["val_acc"]) == pytest.approx(summary["val_acc"])        # rank 0's metrics reached Tune
    # both ranks trained: the final checkpoint holds both ranks' RNG states, and the SET updates (every 5 steps)
    # passed the engine's cross-rank mask agreement check
    from engine.checkpoint import load_state

    final = sorted((trial / "checkpoints").glob("ckpt-e0002-*.pt"))
    assert final and len(load_state(str(final[-1]))["rng"]) == 2
    with open(trial / "mask_updates.csv") as handle:
        assert len(list(csv.DictReader(handle))) >= 2
    # the same config trained by the launcher's own two DDP workers (torchrun) ends on the same weights and masks
    direct = subprocess.run([sys.executable, "-m", "launcher", "train", str(trial / "config.yaml"), "--nproc-per-node",
                             "2", f"output_dir={tmp_path / 'direct'}", "name=direct", "resume=null"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-3000:]
    alone = json.loads((tmp_path / "direct" / "direct" / "summary.json").read_text())
    assert (alone["test_acc"], alone["val_acc"], alone["steps"]) == (summary["test_acc"], summary["val_acc"],
                                                                     summary["steps"])
    ours = load_state(str(final[-1]))
    theirs = load_state(str(sorted((tmp_path / "direct" / "direct" / "checkpoints").glob("ckpt-e0002-*.pt"))[-1]))
    for name, tensor in ours["model"].items():
        assert torch.equal(tensor, theirs["model"][name]), f"{name} differs between the Ray Train trial and torchrun"
    for name, mask in ours["masks"].items():
        assert torch.equal(mask, theirs["masks"][name])

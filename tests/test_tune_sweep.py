"""Sweeps through Ray Tune end to end on digits (2 local Ray CPUs): ASHA to completion, and a killed driver resumed."""

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


@pytest.mark.slow
@pytest.mark.skip(reason="open bug: on a loaded 2-core machine the interrupted trial restarts from epoch 0 instead of "
                         "its Tune checkpoint (finished trials are correctly not rerun); tracked on the Ray Tune issue")
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    # one trial at a time, small batches: each trial takes a few seconds, so the driver dies inside the second one
    base = {**BASE, "data": {**BASE["data"], "batch_size": 16}, "train": {"epochs": 5, "device": "cpu"}}
    path = _write(tmp_path, base=base, space={"sparsity.density": {"grid": [0.3, 0.2, 0.1]}}, max_concurrent=1,
                  scheduler={"name": "fifo"})
    trials = tmp_path / "sweeps" / "s" / "trials"
    driver = _launch(path)
    finished: list[Path] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and driver.poll() is None:
            dirs = sorted(trials.glob("trial_*")) if trials.exists() else []
            finished = [d for d in dirs if (d / "summary.json").exists()]
            # two engine checkpoints: the first epoch's report has reached the driver, even on a loaded machine
            running = [d for d in dirs if not (d / "summary.json").exists()
                       and len(list(d.glob("checkpoints/ckpt-*"))) >= 2]
            if finished and running:
                break
            time.sleep(0.05)
        assert finished and driver.poll() is None, "the sweep ended before it could be killed mid-way"
        time.sleep(3.0)      # the sweep's state is saved every second (TUNE_GLOBAL_CHECKPOINT_S=1)
    finally:
        _kill_tree(driver)
    first_summaries = {d.name: (d / "summary.json").stat().st_mtime_ns for d in finished}
    assert len(first_summaries) < 3

    resumed = _launch(path, "resume=true")
    output, _ = resumed.communicate(timeout=500)
    assert resumed.returncode == 0, output[-3000:]
    rows = _rows(tmp_path / "sweeps" / "s")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"} and {r["epochs"] for r in rows} == {"5"}
    for name, mtime in first_summaries.items():        # finished before the kill: not run again
        assert (trials / name / "summary.json").stat().st_mtime_ns == mtime
        assert not (trials / name / "tune_restores.jsonl").exists()
    restored = [d for d in trials.glob("trial_*") if (d / "tune_restores.jsonl").exists()]
    assert restored, "the interrupted trial started over instead of resuming from its checkpoint"
    for trial in restored:
        record = json.loads((trial / "tune_restores.jsonl").read_text().splitlines()[0])
        assert record["pointer"]["run_dir"] == str(trial) and record["pointer"]["epoch"] >= 1
        assert record["resume"].startswith(str(trial / "checkpoints" / "ckpt-e"))
        assert json.loads((trial / "summary.json").read_text())["epochs"] == 5

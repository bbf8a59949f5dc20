"""Ray Tune's overhead per trial, and what ASHA saves, on digits.

    python -m benchmarks.tune_overhead                 # N identical-size runs: by hand vs through Tune
    python -m benchmarks.tune_overhead --asha 16       # also: 16 trials with ASHA vs the same 16 run to the end

Overhead: the same N configs (a small sparse SET MLP, different seeds) trained one after another by hand (each
``train(cfg)`` in this process, and each as its own ``python -m launcher train`` process, the way a person launches
runs) against one Tune sweep of them, one trial at a time, one thread each. Tune's overhead per trial = (sweep wall
time - the by-hand in-process wall time) / N, with Ray's start-up reported apart (paid once per sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from engine.config import build, write_yaml
from tune.spec import SweepConfig, plan_sweep

BASE = {"model": {"name": "mlp", "options": {"hidden": [64]}},
        "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.1},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "train": {"epochs": 3, "device": "cpu"},
        "sparsity": {"method": "set", "density": 0.1, "distribution": "erk", "period": 10},
        "monitor": {"progress": False}}


def _plan(root: str, name: str, space: dict[str, Any], scheduler: dict[str, Any], concurrent: int,
          samples: int = 1, epochs: int = 3) -> Any:
    sweep = build(SweepConfig, {"name": name, "base": BASE, "space": space, "sweep_dir": root,
                                "scheduler": scheduler, "max_concurrent": concurrent, "num_samples": samples,
                                "set": {"train.epochs": epochs}, "searcher": {"seed": 0},
                                "ray": {"num_cpus": 2}, "resources": {"cpus": 1}})
    return plan_sweep(sweep)


def _tune(plan: Any) -> tuple[float, list[dict[str, Any]]]:
    from tune.results import trial_rows
    from tune.runner import run_sweep

    started = time.perf_counter()
    grid = run_sweep(plan, verbose=0)
    return time.perf_counter() - started, trial_rows(plan, grid)


def overhead(n: int, root: str) -> dict[str, Any]:
    import ray
    import torch

    from engine.trainer import train

    plan = _plan(root, "overhead", {"seed": {"grid": list(range(n))}}, {"name": "fifo"}, 1)
    torch.set_num_threads(1)               # as a trial holding one CPU runs (resources.cpus=1)
    by_hand = []
    for seed in range(n):
        cfg = plan.trial_config({"seed": seed}, name=f"hand_{seed}")
        started = time.perf_counter()
        train(cfg)
        by_hand.append(time.perf_counter() - started)
    processes = []
    for seed in range(n):
        path = os.path.join(root, f"hand_{seed}.yaml")
        data = plan.run_data({"seed": seed})
        data.update(name=f"cli_{seed}", output_dir=os.path.join(root, "cli"))
        write_yaml(data, path)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "launcher", "train", path], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        processes.append(time.perf_counter() - started)
    from tune.runner import start_ray

    started = time.perf_counter()
    start_ray(plan)
    ray_start = time.perf_counter() - started
    try:
        wall, rows = _tune(plan)
    finally:
        ray.shutdown()
    return {"trials": n, "epochs": BASE["train"]["epochs"], "ray_start_s": ray_start, "tune_wall_s": wall,
            "by_hand_in_process_s": sum(by_hand), "by_hand_processes_s": sum(processes),
            "trial_time_in_tune_s": sum(r["time_s"] for r in rows),
            "overhead_per_trial_s": (wall - sum(by_hand)) / n,
            "overhead_per_trial_vs_processes_s": (wall + ray_start - sum(processes)) / n}


def asha_saving(n: int, root: str) -> dict[str, Any]:
    space = {"sparsity.density": {"loguniform": [0.005, 0.5]}, "sparsity.drop_fraction": {"uniform": [0.1, 0.5]}}
    out: dict[str, Any] = {"trials": n, "epochs": 6}
    for scheduler in ({"name": "asha", "grace_period": 1, "reduction_factor": 2}, {"name": "fifo"}):
        plan = _plan(root, f"asha_{scheduler['name']}", space, scheduler, 2, samples=n, epochs=6)
        wall, rows = _tune(plan)
        out[scheduler["name"]] = {"wall_s": wall, "epochs_run": sum(r["epochs"] for r in rows),
                                  "stopped_early": sum(bool(r["stopped_early"]) for r in rows),
                                  "best_val_acc": max(r["val_acc"] for r in rows)}   # seed 0: the same configs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--asha", type=int, default=0, help="also time N trials with ASHA vs run to the end")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tune_overhead_")
    try:
        figures: dict[str, Any] = {"machine": f"{os.cpu_count()}-core CPU", "overhead": overhead(args.trials, root)}
        if args.asha:
            figures["asha"] = asha_saving(args.asha, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

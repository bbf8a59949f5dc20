"""Accuracy against connectivity on digits for spiking nets: Grad R at several penalties, Deep R (style spiking) at the
connectivity each Grad R point reached, and the dense baseline (no_prune).

Every run is configs/spiking/digits_*.yaml (64-800-10 spiking MLP, T = 8, Adam lr 1e-3, rate-MSE loss, batch 64,
40 epochs) with the penalty, density and seed changed. Deep R gets density = Grad R's mean final connectivity at the
same penalty, and that penalty as its l1. Writes a JSON of every run, a PNG plot and prints the Markdown table of
docs/spiking.md. A measurement script, not a test.

    python3 -m benchmarks.spiking_sweep                                     # the docs' figures
    python3 -m benchmarks.spiking_sweep --penalties 0.1,0.35 --seeds 0 --epochs 20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.run_config import load_config
from engine.trainer import train

QUIET = ["monitor.progress=false", "monitor.tensorboard=false", "checkpoint.every_epochs=100000",
         "checkpoint.save_final=false"]


def run(config: str, overrides: list[str], out_dir: str) -> dict[str, Any]:
    cfg = load_config(f"configs/spiking/{config}.yaml", [*overrides, *QUIET, f"output_dir={out_dir}"])
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg)
    metrics = summary.get("method_metrics", {})
    return {"config": config, "overrides": overrides, "test_acc": summary["test_acc"],
            "best_test_acc": summary["best_test_acc"], "connectivity": summary["density"],
            "connectivity_all": metrics.get("connectivity_all", summary["density"]),
            "firing_rate_hidden": summary["spikes/firing_rate/lif1"], "seconds": time.perf_counter() - started}


def point(runs: list[dict[str, Any]]) -> dict[str, float]:
    acc = [r["test_acc"] for r in runs]
    conn = [r["connectivity"] for r in runs]
    return {"acc_mean": statistics.mean(acc), "acc_min": min(acc), "acc_max": max(acc),
            "connectivity_mean": statistics.mean(conn), "connectivity_min": min(conn), "connectivity_max": max(conn),
            "firing_rate_hidden": statistics.mean(r["firing_rate_hidden"] for r in runs),
            "seconds": statistics.mean(r["seconds"] for r in runs)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("grad_r", "o-"), ("deep_r", "s--")):
        points = result["points"][name]
        xs = [100 * p["connectivity_mean"] for p in points]
        ys = [100 * p["acc_mean"] for p in points]
        ax.plot(xs, ys, marker, label={"grad_r": "Grad R", "deep_r": "Deep R (spiking style)"}[name])
        for p, x in zip(points, xs):
            ax.vlines(x, 100 * p["acc_min"], 100 * p["acc_max"], colors="grey", linewidth=0.8)
    dense = result["points"]["no_prune"][0]
    ax.axhline(100 * dense["acc_mean"], color="black", linestyle=":", label="dense (no_prune)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([2, 5, 10, 20, 50, 100])
    ax.set_xlabel("connectivity (% of prunable weights non-zero, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Spiking MLP on digits, {result['epochs']} epochs, seeds {result['seeds']}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(result: dict[str, Any]) -> str:
    lines = ["| method | penalty (alpha / l1) | connectivity | test accuracy (mean, min-max) | hidden firing rate |",
             "| --- | --- | --- | --- | --- |"]
    dense = result["points"]["no_prune"][0]
    lines.append(f"| dense (no_prune) | - | 100% | {100 * dense['acc_mean']:.2f}% "
                 f"({100 * dense['acc_min']:.2f}-{100 * dense['acc_max']:.2f}) | {dense['firing_rate_hidden']:.3f} |")
    for penalty, grad, deep in zip(result["penalties"], result["points"]["grad_r"], result["points"]["deep_r"]):
        for name, p in (("Grad R", grad), ("Deep R", deep)):
            lines.append(f"| {name} | {penalty:g} | {100 * p['connectivity_mean']:.2f}% | {100 * p['acc_mean']:.2f}% "
                         f"({100 * p['acc_min']:.2f}-{100 * p['acc_max']:.2f}) | {p['firing_rate_hidden']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--penalties", default="0.05,0.1,0.2,0.35,0.6")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="docs/spiking_digits.json")
    parser.add_argument("--plot", default="docs/spiking_digits.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot and table from --out")
    args = parser.parse_args()
    if args.replot:
        result = json.loads(Path(args.out).read_text())
        plot(result, Path(args.plot))
        print(table(result))
        return
    penalties = [float(p) for p in args.penalties.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [f"train.epochs={args.epochs}"]
    runs: dict[str, list[dict[str, Any]]] = {"no_prune": [], "grad_r": [], "deep_r": []}
    points: dict[str, list[dict[str, float]]] = {"no_prune": [], "grad_r": [], "deep_r": []}
    with tempfile.TemporaryDirectory() as out_dir:
        dense = [run("digits_no_prune", [*common, f"seed={s}", f"name=dense{s}"], out_dir) for s in seeds]
        runs["no_prune"] += dense
        points["no_prune"].append(point(dense))
        print(f"dense: {points['no_prune'][0]}", flush=True)
        for penalty in penalties:
            grad = [run("digits_grad_r", [*common, f"seed={s}", f"name=g{penalty}-{s}",
                                          f"sparsity.penalty={penalty}"], out_dir) for s in seeds]
            runs["grad_r"] += grad
            points["grad_r"].append(point(grad))
            density = round(points["grad_r"][-1]["connectivity_mean"], 4)
            deep = [run("digits_deep_r", [*common, f"seed={s}", f"name=d{penalty}-{s}", f"sparsity.density={density}",
                                          f"sparsity.l1={penalty}"], out_dir) for s in seeds]
            runs["deep_r"] += deep
            points["deep_r"].append(point(deep))
            print(f"penalty {penalty}: grad_r {points['grad_r'][-1]}\n  deep_r {points['deep_r'][-1]}", flush=True)
    result = {"machine": "2-core CPU VM, shared", "epochs": args.epochs, "seeds": seeds, "penalties": penalties,
              "points": points, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    plot(result, Path(args.plot))
    print(table(result))


if __name__ == "__main__":
    main()

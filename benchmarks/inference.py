"""Inference of exported sparse models vs the masked dense model: latency, throughput and the weights' memory.

For each model and density, the prunable weights are pruned at init by magnitude (per layer, keeping the largest
round(density * n); for speed only the zero pattern matters, not the accuracy; ``vit_strip_mlp`` is vit_strip with
only its MLP linears pruned, the stripping experiments' setting), the model is exported to ``csr``
(every layer timed dense vs sparse, the faster kept: ``pruning.export.csr``) and both are timed at batch 1 and at
the serving batch, interleaved round by round (``benchmarks.timing``) so load drift on a shared machine hits both
alike. The ratio column is the median of per-round ratios dense / exported (above 1: the export is faster).
``--clock cpu`` (the default, with one thread) times the CPU time of the one torch thread rather than wall time: on a
shared machine a process waiting for a core is not charged for the wait (the per-layer choice at export is timed
the same way).

    python3 -m benchmarks.inference                    # LeNet-300-100, ResNet-20, vit_strip, vit_strip_mlp
    python3 -m benchmarks.inference --models lenet_300_100 --densities 0.05 --rounds 20 --threads 1
    python3 -m benchmarks.inference --compact 0.5,0.25 --models lenet_300_100,resnet20     # unit-pruned, compact
    python3 -m benchmarks.inference --output docs/export_speed.json --plot docs/export_speed.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import models
from benchmarks.timing import interleaved, ratio_stats
from launcher.export import example_input, export_model
from pruning.export import plain_model, tensor_bytes
from pruning.targets import ROLES, TargetConfig, prunable_parameters

SHAPES = {  # model -> (channels, image size, classes, options): the data set each is usually trained on
    "lenet_300_100": (1, 28, 10, {}),
    "resnet20": (3, 32, 10, {}),
    "vit_strip": (3, 32, 10, {}),
    "vit_strip_mlp": (3, 32, 10, {}),
}
BUILD = {"vit_strip_mlp": "vit_strip"}   # benchmark name -> registered model
TARGETS = {"vit_strip_mlp": TargetConfig(layers=["linear"], exclude_roles=[
    role for role in ROLES if role not in ("mlp_fc1", "mlp_fc2")])}   # only the MLPs' linears pruned
SERVING = {"lenet_300_100": 256, "resnet20": 128, "vit_strip": 32,   # one forward well under a second, 1 thread
           "vit_strip_mlp": 32}


@torch.no_grad()
def magnitude_masked(name: str, density: float, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """(``name`` at init with every prunable layer cut to its largest round(density * n) weights, a manifest)."""
    channels, size, classes, options = SHAPES[name]
    torch.manual_seed(seed)
    model = models.build_model(BUILD.get(name, name), in_channels=channels, image_size=size, num_classes=classes,
                               **options).eval()
    for weight in prunable_parameters(model, TARGETS.get(name, TargetConfig())).values():
        keep = max(1, round(density * weight.numel()))
        order = weight.abs().reshape(-1).argsort(descending=True)
        weight.view(-1)[order[keep:]] = 0.0
    manifest = {"model": {"name": BUILD.get(name, name), "options": options},
                "input": {"channels": channels, "image_size": size, "num_classes": classes}}
    return model, manifest


@torch.no_grad()
def unit_masked(name: str, units: float, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """(``name`` at init with every prunable layer but the output one keeping its round(units * n) rows / filters
    of largest L2 norm, the others zeroed; a manifest)."""
    model, manifest = magnitude_masked(name, 1.0, seed)
    weights = list(prunable_parameters(model, TargetConfig()).values())
    for weight in weights[:-1]:
        norms = weight.reshape(weight.shape[0], -1).norm(dim=1)
        keep = max(1, round(units * weight.shape[0]))
        weight[norms.argsort(descending=True)[keep:]] = 0.0
    return model, manifest


def compare(entries: dict[str, tuple[nn.Module, int]], manifest: dict[str, Any], batches: list[int],
            device: torch.device, rounds: int = 30, warmup: int = 3,
            clock: Callable[[], float] | None = None) -> list[dict[str, Any]]:
    """One row per (batch, variant): median ms, samples/s, speedup over the first entry (median, IQR), weight MB;
    ``clock``: a CPU clock instead of wall time (``benchmarks.timing.timed``)."""
    rows = []
    for batch in batches:
        x = example_input(manifest, batch, device)
        steps = {name: (lambda m=model: m(x)) for name, (model, _) in entries.items()}
        with torch.inference_mode():
            times, _ = interleaved(steps, rounds, warmup, device, clock)
        reference = times[next(iter(entries))]
        for name, (_, weight_bytes) in entries.items():
            median, low, high = ratio_stats(reference, times[name])
            seconds = statistics.median(times[name])
            rows.append({"batch": batch, "variant": name, "ms": 1e3 * seconds, "samples_per_s": batch / seconds,
                         "speedup": median, "iqr": [low, high], "weight_mb": weight_bytes / 1e6})
    return rows


def format_rows(rows: list[dict[str, Any]], label: str = "", header: bool = True) -> str:
    """Markdown rows (after a header unless ``header`` is false), the first column ``label``."""
    lines = ["| model | batch | variant | median ms | samples/s | speedup (IQR) | weights MB |",
             "| --- | ---: | --- | ---: | ---: | --- | ---: |"] if header else []
    for row in rows:
        lines.append(f"| {label} | {row['batch']} | {row['variant']} | {row['ms']:.3f} | {row['samples_per_s']:.0f} "
                     f"| {row['speedup']:.2f} ({row['iqr'][0]:.2f}-{row['iqr'][1]:.2f}) | {row['weight_mb']:.3f} |")
    return "\n".join(lines)


def plot(report: list[dict[str, Any]], path: str) -> None:
    """Speedup over dense at batch 1 and at the serving batch, and weight shrink, against density, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in dict.fromkeys(entry["model"] for entry in report):
        entries = [e for e in report if e["model"] == name]
        densities = [e["density"] for e in entries]
        exported = [[r for r in e["rows"] if r["variant"] != "dense"] for e in entries]
        axes[0].plot(densities, [rows[0]["speedup"] for rows in exported], "o-", label=name)
        axes[1].plot(densities, [rows[-1]["speedup"] for rows in exported], "o-",
                     label=f"{name} (batch {exported[0][-1]['batch']})")
        dense = [[r for r in e["rows"] if r["variant"] == "dense"][0]["weight_mb"] for e in entries]
        axes[2].plot(densities, [d / rows[0]["weight_mb"] for d, rows in zip(dense, exported)], "o-", label=name)
    for axis, title in zip(axes, ("speedup, batch 1", "speedup, serving batch", "weights: dense / exported")):
        axis.set_xscale("log")
        axis.set_xlabel("density")
        axis.set_title(title)
        axis.axhline(1.0, color="grey", lw=0.8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet_300_100,resnet20,vit_strip,vit_strip_mlp")
    parser.add_argument("--densities", default="0.1,0.05,0.02")
    parser.add_argument("--serving-batch", type=int, help="default: per model (256 LeNet, 128 ResNet-20, 32 ViTs)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the thread's CPU time (needs --threads 1); wall: elapsed time")
    parser.add_argument("--compact", help="unit fractions (e.g. 0.5,0.25): unit-prune and export compact instead")
    parser.add_argument("--output", help="write all rows and per-layer choices as JSON here")
    parser.add_argument("--plot", help="draw the run's (or --replot's) speedups and weight shrink into this PNG")
    parser.add_argument("--replot", help="plot a JSON written by --output instead of measuring")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as handle:
            plot(json.load(handle), args.plot or args.replot.removesuffix(".json") + ".png")
        return
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread's CPU time: it needs --threads 1 (or use --clock wall)")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else None
    device = torch.device("cpu")
    report: list[dict[str, Any]] = []
    print(format_rows([]))
    for name in args.models.split(","):
        for density in (float(d) for d in (args.compact or args.densities).split(",")):
            fmt = "compact" if args.compact else "csr"
            model, manifest = (unit_masked if args.compact else magnitude_masked)(name, density)
            serving = args.serving_batch or SERVING[name]
            choices: list[str] = []
            exported, tensors, _ = export_model(model, manifest, fmt, device, serving, report=choices.append)
            dense_bytes = tensor_bytes(dict(model.state_dict()))
            entries = {"dense": (plain_model(model), dense_bytes), fmt: (exported, tensor_bytes(tensors))}
            rows = compare(entries, manifest, [1, serving], device, args.rounds, clock=clock)
            label = f"{name} units={density}" if args.compact else f"{name} d={density}"
            print(format_rows(rows, label, header=False), flush=True)
            if args.compact:
                ratio = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in exported.parameters())
                print(f"<!-- {label}: parameters {ratio:.2f}x fewer -->", flush=True)
            else:
                kept = sum("-> csr" in line for line in choices)
                print(f"<!-- {label}: {kept}/{len(choices)} layers csr -->", flush=True)
            report.append({"model": name, "density": density, "rows": rows, "layers": choices})
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()

"""The layer-collapse experiment of the Synaptic Flow paper: VGG-16-BN at CIFAR-100 shape, no data, no training.

For each method and compression (log10 of 1 / density) prune at init and record whether any prunable layer kept
nothing; the critical compression is the largest tested one up to which no layer collapsed. Writes the JSON report,
a PNG plot and prints a markdown table (used in docs/layer_collapse.md).

    python3 -m benchmarks.layer_collapse                                  # synflow, magnitude, random, 0:6:0.25
    python3 -m benchmarks.layer_collapse --synflow-compressions 0:5:1,5.5,5.75,6     # what docs/ shows
    python3 -m benchmarks.layer_collapse --init fan_in --methods magnitude,random --output docs/layer_collapse_fan_in
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
from torch import nn

from engine.config import apply_overrides, build
from engine.run_config import RunConfig
from launcher.prune import critical_compression, parse_compressions, run_prune

MAX_COMPRESSION_NOTE = "one weight per layer"


def parse_mixed(text: str) -> list[float]:
    """Comma-separated parts, each a number or a start:stop:step range."""
    values: set[float] = set()
    for part in text.split(","):
        values.update(parse_compressions(part))
    return sorted(values)


def markdown_table(report: dict[str, Any]) -> str:
    """Compression rows, one column per method: collapsed layers (0 = all alive) and the smallest layer density."""
    methods = list(report["methods"])
    by_method = {m: {r["compression"]: r for r in report["methods"][m]["runs"]} for m in methods}
    compressions = sorted({c for runs in by_method.values() for c in runs})
    head = "| compression | density | " + " | ".join(f"{m}: collapsed / min layer density" for m in methods) + " |"
    lines = [head, "|" + " ---: |" * (2 + len(methods))]
    for c in compressions:
        cells = []
        for m in methods:
            run = by_method[m].get(c)
            if run is None:
                cells.append("")
                continue
            low = min(layer["density"] for layer in run["layers"].values())
            cells.append(f"{len(run['collapsed_layers'])} / {low:.1e}")
        lines.append(f"| {c:g} | {10 ** -c:.1e} | " + " | ".join(cells) + " |")
    lines.append("| **critical** | | " + " | ".join(
        f"**10^{report['methods'][m]['critical_compression']:g}**" if report["methods"][m]["critical_compression"]
        is not None else "none" for m in methods) + " |")
    return "\n".join(lines)


def he_fan_in(model: nn.Module) -> None:
    """Re-initialise conv and linear weights He-normal (fan_in), the Synaptic Flow code's initialisation."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)


def plot(report: dict[str, Any], path: str) -> None:
    """Left: collapsed layers vs compression; right: smallest layer density vs compression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["prunable"]
    limit = math.log10(sum(sizes.values()) / len(sizes))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, result in report["methods"].items():
        runs = sorted(result["runs"], key=lambda r: r["compression"])
        xs = [r["compression"] for r in runs]
        left.plot(xs, [len(r["collapsed_layers"]) for r in runs], marker="o", label=method)
        right.plot(xs, [max(1e-9, min(layer["density"] for layer in r["layers"].values())) for r in runs],
                   marker="o", label=method)
    for axis in (left, right):
        axis.axvline(limit, color="grey", linestyle=":",
                     label=f"max compression 10^{limit:.2f} ({MAX_COMPRESSION_NOTE})")
        axis.set_xlabel("compression (log10 of 1 / density)")
        axis.grid(alpha=0.3)
    left.set_ylabel("collapsed layers (kept nothing)")
    right.set_ylabel("smallest layer density (1e-9 = collapsed)")
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"Layer collapse at initialisation: {report['model']}, {report['data']} shape, "
                 f"{len(sizes)} prunable layers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vgg16_bn")
    parser.add_argument("--data", default="cifar100")
    parser.add_argument("--methods", default="synflow,magnitude,random")
    parser.add_argument("--compressions", default="0:6:0.25")
    parser.add_argument("--synflow-compressions", default=None, help="a different list for synflow (it is slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=("model", "fan_in"), default="model",
                        help="model: the model's own init; fan_in: every conv and linear weight He-normal with "
                             "fan_in, as the Synaptic Flow code initialises its models")
    parser.add_argument("--output", default="docs/layer_collapse")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = build(RunConfig, apply_overrides({}, [f"model.name={args.model}", f"data.name={args.data}",
                                                  f"seed={args.seed}", "train.device=cpu"]))
    report: dict[str, Any] = {}
    started = time.perf_counter()
    for method in args.methods.split(","):
        text = args.synflow_compressions if method == "synflow" and args.synflow_compressions else args.compressions
        part = run_prune(cfg, [method], parse_mixed(text), {}, log=lambda line: print(line, flush=True),
                         prepare=he_fan_in if args.init == "fan_in" else None)
        if not report:
            report = part
        else:
            report["methods"].update(part["methods"])
    for result in report["methods"].values():
        result["critical_compression"] = critical_compression(result["runs"])
    report["wall_s"] = time.perf_counter() - started
    report["torch_threads"] = torch.get_num_threads()
    report["init"] = args.init
    with open(f"{args.output}.json", "w") as handle:
        json.dump(report, handle, indent=2)
    plot(report, f"{args.output}.png")
    print(markdown_table(report))
    print(f"\nwrote {args.output}.json and {args.output}.png in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

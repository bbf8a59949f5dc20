"""The layer-collapse experiment of the Synaptic Flow paper: VGG-16-BN at CIFAR-100 shape, no training.

For each method and compression (log10 of 1 / density) prune at init with the settings of a run config (by default
``configs/synflow/vgg16_bn_cifar100.yaml``: the seed's model and initialisation, the reference's selection rule) and
record whether any prunable layer kept nothing; the critical compression is the largest tested one up to which no
layer collapsed. Writes the JSON report, a PNG plot and prints a markdown table (used in docs/layer_collapse.md).
SNIP and GraSP score data: where the config's data set is not on disk, ``--scoring-data synthetic`` scores them on
random images of the same shape and number of classes (the data-free methods do not read data at all).

    python3 -m benchmarks.layer_collapse                                   # every method, 0:6:0.25
    python3 -m benchmarks.layer_collapse --synflow-compressions 0:5:0.5,5.25:6:0.25 --scoring-data synthetic
    python3 -m benchmarks.layer_collapse model.options.init=default --methods magnitude --output /tmp/lc
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from engine.config import read_yaml
from engine.data import data_shape
from launcher.prune import critical_compression, parse_compressions, run_prune, split_config

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
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. model.options.init=default")
    parser.add_argument("--config", default="configs/synflow/vgg16_bn_cifar100.yaml")
    parser.add_argument("--methods", default="magnitude,random,snip,grasp,synflow")
    parser.add_argument("--compressions", default="0:6:0.25")
    parser.add_argument("--synflow-compressions", default=None, help="a different list for synflow (it is slow)")
    parser.add_argument("--scoring-data", choices=("config", "synthetic"), default="config",
                        help="synthetic: score SNIP and GraSP on random images of the config's data shape")
    parser.add_argument("--output", default="docs/layer_collapse")
    args = parser.parse_args()
    cfg, shared = split_config(args.config, [*args.overrides, "train.device=cpu"])
    if args.scoring_data == "synthetic":
        shape = data_shape(cfg.data)
        samples = shared.get("samples_per_class", 10) * shape.num_classes
        cfg, _ = split_config(args.config, [
            *args.overrides, "train.device=cpu", "data.name=synthetic", "data.augment=none",
            f"data.options={{image_size: {shape.input_shape[-1]}, num_classes: {shape.num_classes}, "
            f"channels: {shape.input_shape[0]}, train_size: {4 * samples}, test_size: 2}}"])
    config_method = read_yaml(args.config).get("sparsity", {}).get("method")

    def settings(method: str) -> dict[str, Any]:
        """The config's sparsity keys; its iteration count belongs to its own method only (the paper prunes SynFlow
        in 100 iterations and every other method in one shot)."""
        if method == config_method:
            return shared
        return {k: v for k, v in shared.items() if k != "iterations"}

    report: dict[str, Any] = {}
    started = time.perf_counter()
    for method in args.methods.split(","):
        text = args.synflow_compressions if method == "synflow" and args.synflow_compressions else args.compressions
        part = run_prune(cfg, [method], parse_mixed(text), settings(method), log=lambda line: print(line, flush=True))
        if not report:
            report = part
        else:
            report["methods"].update(part["methods"])
    for result in report["methods"].values():
        result["critical_compression"] = critical_compression(result["runs"])
    report["wall_s"] = time.perf_counter() - started
    report["torch_threads"] = torch.get_num_threads()
    report["config"] = args.config
    report["overrides"] = args.overrides
    report["scoring_data"] = args.scoring_data
    with open(f"{args.output}.json", "w") as handle:
        json.dump(report, handle, indent=2)
    plot(report, f"{args.output}.png")
    print(markdown_table(report))
    print(f"\nwrote {args.output}.json and {args.output}.png in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

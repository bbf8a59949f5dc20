"""Cost of pruning at initialisation next to one training step: ResNet-50 at 224 px on the CPU.

Times ``method.setup()`` (score, select, mask; everything pruning at init does) for SynFlow (100 iterations, data
free), SNIP and GraSP (on ``--samples`` synthetic 224 px images; their cost is linear in the number of scoring
samples, so the default of 10 per class is also extrapolated), and one SGD training step of the same model at
``--batch-size``. A measurement script, not a test.

    python3 -m benchmarks.prune_at_init
    python3 -m benchmarks.prune_at_init --model resnet18 --image-size 32 --iterations 10    # a quick look

With ``--against-reference DIR`` (a checkout of github.com/ganguli-lab/Synaptic-Flow) it instead times the original
code's pruning loop and ours on the same model, weights and scoring batches, interleaved over ``--rounds`` rounds,
and prints seconds, the ratio original / ours (above 1: we are faster) and the overlap (IoU) of the two masks; ours
runs with the original's selection rule and float32, the settings under which the masks must agree:

    python3 -m benchmarks.prune_at_init --against-reference ~/Synaptic-Flow --model vgg16_bn --image-size 32 \
        --num-classes 100 --density 1e-3 --samples 1000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import models
from engine.data import DataConfig, build_loaders
from pruning.methods import MethodConfig, MethodContext, build_method
from pruning.methods.grasp import GraSPConfig
from pruning.methods.snip import DataScoredConfig
from pruning.methods.synflow import SynFlowConfig


def seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def train_step_seconds(model: nn.Module, batch_size: int, image_size: int, num_classes: int, repeats: int) -> float:
    """Median seconds of forward + backward + SGD step on one batch (after one warm-up step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    inputs = torch.randn(batch_size, 3, image_size, image_size)
    targets = torch.randint(0, num_classes, (batch_size,))
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    step()
    return statistics.median(seconds(step) for _ in range(repeats))


def prune_seconds(model: nn.Module, initial: dict[str, torch.Tensor], cfg: MethodConfig,
                  context: MethodContext) -> float:
    """Seconds of one full ``setup()`` from the initial weights."""
    model.load_state_dict(initial)
    method = build_method(cfg, model, None, context)
    return seconds(method.setup)


def config(cls: type, **values: Any) -> Any:
    """``cls(**values)`` with only the fields ``cls`` has (so this script also times older versions of the code)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def against_reference(args: argparse.Namespace) -> None:
    """Time the original Synaptic Flow loop and ours on identical weights and batches; compare their masks."""
    from benchmarks.synflow_reference import Reference, iou
    from benchmarks.timing import interleaved, ratio_stats

    reference = Reference(args.against_reference)
    shape = (3, args.image_size, args.image_size)
    torch.manual_seed(0)
    ours = models.build_model(args.model, in_channels=3, image_size=args.image_size, num_classes=args.num_classes,
                              **dict(option.split("=", 1) for option in args.model_option))
    initial = copy.deepcopy(ours.state_dict())
    per_class = max(1, args.samples // args.num_classes)
    count = per_class * args.num_classes if args.samples >= args.num_classes else args.samples
    generator = torch.Generator().manual_seed(0)   # the same samples for both: every class equally often
    inputs = torch.randn(count, *shape, generator=generator)
    labels = torch.arange(count) % args.num_classes
    batches = [(inputs[i:i + 256], labels[i:i + 256]) for i in range(0, count, 256)]
    context = MethodContext(batches=lambda: batches, input_shape=shape)
    device = torch.device("cpu")
    print(f"{args.model}, {args.image_size} px, {args.num_classes} classes, density {args.density:g}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; original code from "
          f"{args.against_reference}; {args.rounds} interleaved rounds")
    print("| method | work | original s | ours s | original / ours (IQR) | mask IoU |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for method in args.methods.split(","):
        iterations = args.iterations if method == "synflow" else 1
        common = dict(method=method, density=args.density, iterations=iterations, selection="reference")
        cfg = {"synflow": lambda: config(SynFlowConfig, precision=args.precision, **common),
               "snip": lambda: config(DataScoredConfig, samples_per_class=per_class, scoring_batch_size=256,
                                      **common),
               "grasp": lambda: config(GraSPConfig, samples_per_class=per_class, scoring_batch_size=256,
                                       **common)}[method]()
        masks: dict[str, list[torch.Tensor]] = {}

        def run_ours() -> None:
            ours.load_state_dict(initial)
            pruner = build_method(cfg, ours, None, context)
            pruner.setup()
            masks["ours"] = [pruner.masks[name].clone() for name in pruner.masks]

        def run_original() -> None:
            ours.load_state_dict(initial)
            theirs = reference.loaded(args.model, ours, shape, args.num_classes)
            masks["original"] = reference.prune(method, theirs, batches, args.density, iterations, device)

        times, _ = interleaved({"original": run_original, "ours": run_ours}, rounds=args.rounds, warmup=0)
        ratio, low, high = ratio_stats(times["original"], times["ours"])
        work = f"{iterations} iterations" if method == "synflow" else f"{count} samples"
        original_s, ours_s = statistics.median(times["original"]), statistics.median(times["ours"])
        if method != "synflow":
            work += (f" ({original_s / count * 1000:.1f} / {ours_s / count * 1000:.1f} ms per "
                     "sample)")
        print(f"| {method} | {work} | {original_s:.1f} | {ours_s:.1f} | {ratio:.2f} ({low:.2f}-{high:.2f}) | "
              f"{iou(masks['ours'], masks['original']):.6f} |")
        if args.exact_too:   # the same scores under our exact rule: how far another selection rule drifts
            cfg = dataclasses.replace(cfg, selection="exact")
            run_ours()
            print(f"| {method}, exact rule | | | | | {iou(masks['ours'], masks['original']):.6f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--iterations", type=int, default=100, help="SynFlow iterations")
    parser.add_argument("--samples", type=int, default=64, help="scoring samples for SNIP and GraSP")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--against-reference", metavar="DIR", default=None,
                        help="a checkout of the original Synaptic Flow code: time it against ours instead")
    parser.add_argument("--methods", default="synflow,snip,grasp", help="with --against-reference")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, with --against-reference")
    parser.add_argument("--exact-too", action="store_true",
                        help="with --against-reference: also the IoU of our exact rule's masks with the original's")
    parser.add_argument("--precision", default="float32", choices=("float32", "auto", "float64"),
                        help="SynFlow's precision on our side with --against-reference (the original runs float32)")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a model option (repeatable), e.g. init=fan_in")
    args = parser.parse_args()
    if args.against_reference:
        against_reference(args)
        return

    torch.manual_seed(0)
    model = models.build_model(args.model, in_channels=3, image_size=args.image_size, num_classes=args.num_classes)
    initial = copy.deepcopy(model.state_dict())
    data = DataConfig(name="synthetic", batch_size=args.batch_size,
                      options={"image_size": args.image_size, "num_classes": args.samples,
                               "train_size": args.samples, "test_size": 2})
    loaders = build_loaders(data, seed=0)
    context = MethodContext(batches=lambda: loaders.train, input_shape=(3, args.image_size, args.image_size))
    per_class = 1   # the synthetic set has --samples classes: one sample of each

    before = train_step_seconds(model, args.batch_size, args.image_size, args.num_classes, args.repeats)
    rows: list[tuple[str, float, str]] = []
    synflow_cfg = SynFlowConfig(method="synflow", density=args.density, iterations=args.iterations)
    model.load_state_dict(initial)
    synflow = build_method(synflow_cfg, model, None, context)
    spent = seconds(synflow.setup)
    precision = f"float64 in {synflow.float64_iterations} iterations" if synflow.float64_iterations else "float32"
    rows.append((f"SynFlow, {args.iterations} iterations", spent, f"data free, batch 1, {precision}"))
    full = 10 * args.num_classes
    for name, cfg in (("SNIP", DataScoredConfig(method="snip", density=args.density, samples_per_class=per_class)),
                      ("GraSP", GraSPConfig(method="grasp", density=args.density, samples_per_class=per_class))):
        spent = prune_seconds(model, initial, cfg, context)
        rows.append((f"{name}, {args.samples} samples", spent, f"extrapolated to 10 per class ({full} samples): "
                     f"{spent * full / args.samples / 60:.0f} min"))

    model.load_state_dict(initial)
    after = train_step_seconds(model, args.batch_size, args.image_size, args.num_classes, args.repeats)
    step = (before + after) / 2   # timed before and after the pruning runs: load drift shows as a difference
    rows.insert(0, ("one training step", step, f"batch {args.batch_size}, SGD momentum, median of {args.repeats} "
                    f"before ({before:.1f} s) and after ({after:.1f} s), averaged"))
    print(f"{args.model}, {args.image_size} px, {args.num_classes} classes, density {args.density}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("| work | seconds | x one training step | note |")
    print("| --- | ---: | ---: | --- |")
    for label, value, note in rows:
        print(f"| {label} | {value:.1f} | {value / step:.1f} | {note} |")


if __name__ == "__main__":
    main()

"""Training steps per second: dense vs a static mask through the MaskSet vs torch.nn.utils.prune, in one run.

Each variant is its own copy of the same model. Steps are interleaved round-robin (the order rotates every round) so
that drift in machine load hits every variant alike; the ratios printed are medians of per-round ratios to the dense
step of the same round. This is a measurement script, not a test: timings never gate CI.

    python3 -m benchmarks.masked_step                       # ResNet-18, 32 px, batch 64, 90% sparse (the issue's case)
    python3 -m benchmarks.masked_step --model resnet20 --rounds 60 --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune

import models
from benchmarks.timing import interleaved, median_seconds, ratio_stats
from engine.backends import Backend, DistEnv
from engine.config import parse_override as _parse
from engine.optim import OptimConfig, build_optimizer
from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig


def make_step(model: nn.Module, before_step: Callable[[], None], inputs: torch.Tensor,
              targets: torch.Tensor, lr: float, implementation: str) -> Callable[[], float]:
    """One training step exactly as the trainer runs it: forward, backward, before_step, SGD step."""
    backend = Backend(DistEnv(), torch.device("cpu"))
    backend.wrap(model)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=lr, momentum=0.9, weight_decay=5e-4,
                                                   implementation=implementation))

    def step() -> float:
        """Runs one step; returns the seconds spent after backward (masking + optimizer)."""
        loss = nn.functional.cross_entropy(model(inputs), targets)
        backend.backward(loss)
        start = time.perf_counter()
        backend.step(optimizer, before_step)
        return time.perf_counter() - start

    return step


def parse_override(item: str) -> tuple[str, object]:
    keys, value = _parse(item)
    return ".".join(keys), value


def variants(args: argparse.Namespace) -> tuple[dict[str, Callable[[], float]], dict[str, Callable[[], object]]]:
    """The step of each variant, and each variant's per-step masking work on its own (for isolated timing)."""
    torch.manual_seed(0)
    options = {"stem": "cifar"} if "stem" in models.model_options(args.model) else {}
    options.update(dict(parse_override(item) for item in args.option))
    base = models.build_model(args.model, in_channels=3, image_size=args.image_size, num_classes=10, **options)
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    targets = torch.randint(0, 10, (args.batch_size,))
    out: dict[str, Callable[[], float]] = {}
    isolated: dict[str, Callable[[], object]] = {}

    dense = copy.deepcopy(base)
    out["dense"] = make_step(dense, lambda: None, inputs, targets, args.lr, args.optimizer)

    masked = copy.deepcopy(base)
    method = build_method(AtInitConfig(method="magnitude", density=args.density), masked, None, MethodContext())
    method.setup()
    out["maskset"] = make_step(masked, lambda: method.before_step(0), inputs, targets, args.lr, args.optimizer)

    def mask_fresh_grads() -> None:
        for p in method.params.values():
            if p.grad is None:      # the optimizer step cleared them: give the timing real tensors to mask
                p.grad = torch.randn_like(p)
        method.masks.mask_grads_()

    isolated["maskset: mask gradients (once per step)"] = mask_fresh_grads

    pruned = copy.deepcopy(base)
    params = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=1.0 - args.density)
    out["torch_prune"] = make_step(pruned, lambda: None, inputs, targets, args.lr, args.optimizer)
    modules = [m for m, _ in params]
    isolated["torch_prune: weight = weight_orig * mask (every forward)"] = lambda: [
        hook(m, None) for m in modules for hook in m._forward_pre_hooks.values()]
    return out, isolated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--option", action="append", default=[], help="model option key=value (repeatable)")
    parser.add_argument("--optimizer", default="auto", choices=["auto", "fused", "foreach", "loop"],
                        help="torch optimizer kernel, the same for every variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, isolated = variants(args)
    names = list(steps)
    times, updates = interleaved(steps, args.rounds, args.warmup)
    dense = times["dense"]
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, density {args.density}, "
          f"{args.rounds} interleaved rounds, {args.threads} threads, SGD kernel {args.optimizer}, "
          f"torch {torch.__version__}")
    print(f"{'variant':<12} {'median ms/step':>15} {'steps/s vs dense':>17} {'IQR of ratios':>16} "
          f"{'mask+optimizer ms':>18}")
    for name in names:
        ratio, low, high = ratio_stats(dense, times[name])
        print(f"{name:<12} {1000 * statistics.median(times[name]):>15.1f} {ratio:>17.3f} "
              f"{low:>8.3f}..{high:.3f} {1000 * statistics.median(updates[name]):>18.2f}")
    print("\nmasking work alone (median of 40 calls; torch_prune pays a multiply of the same size again in backward):")
    for label, work in isolated.items():
        print(f"  {label:<58} {1000 * median_seconds(work, 40):7.2f} ms")
    print("torch_prune masks inside forward/backward (weight = weight_orig * mask), so its mask+optimizer column "
          "shows only its optimizer step.")


if __name__ == "__main__":
    main()

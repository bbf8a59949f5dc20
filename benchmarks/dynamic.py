"""Training steps per second of the dynamic sparse methods against dense, with a mask update every 100 steps.

WRN-28-2 (the DSR paper's CIFAR network) on CIFAR-shaped synthetic batches; every variant is its own copy of the same
model, built and stepped exactly as the trainer does it: forward, backward, ``method.before_step`` (mask gradients;
RigL also reads dense gradients on update steps), the fused SGD step, ``method.after_step`` (Deep R rewires here at
every step; SET, RigL and DSR update their masks every ``--period`` steps).

Plain steps are timed in interleaved rounds (order rotating each round, as in ``benchmarks.masked_step``). A mask
update happens once per period, so its cost is measured on its own: the method's hooks at an update step minus the
same hooks at a plain step, median of ``--update-repeats`` (each repeat a real update that changes the masks), then
spread over the period. Reported: ms per step, steps/s and the ratio to dense (median of per-round ratios, with the
amortised update added). A measurement script, not a test.

    python3 -m benchmarks.dynamic                                   # every method, batch 32, 6 rounds
    python3 -m benchmarks.dynamic --methods set,dsr --batch-size 100 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

import models
from benchmarks.timing import interleaved, median_seconds, ratio_stats
from engine.backends import Backend, DistEnv
from engine.config import build
from engine.optim import OptimConfig, build_optimizer
from pruning.methods import MethodConfig, MethodContext, build_method, method_class

METHODS = "static,set,rigl,dsr,deep_r,soft_deep_r,hashednet"
EXCLUDE = ["stem", "shortcut", "classifier"]     # the DSR paper's dense layers, for every method alike


def method_config(name: str, args: argparse.Namespace) -> MethodConfig:
    """The method's own config at ``--density`` with a constant ``--period`` (where it has one)."""
    data: dict = {"method": "random" if name == "static" else name, "targets": {"exclude_roles": EXCLUDE}}
    data["density"] = args.density
    fields = method_class(data["method"]).Config.__dataclass_fields__
    if "period" in fields:
        data.update(period=args.period, period_epochs=[], periods=[])
    if name == "static":
        data["scope"] = "layer"
    if name == "dsr":
        data["target_pruned"] = args.target_pruned
    return build(method_class(data["method"]).Config, data, "sparsity")


class Variant:
    """One model copy, its optimizer and method; ``step`` is one training step as the trainer runs it."""

    def __init__(self, name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 args: argparse.Namespace) -> None:
        self.name, self.inputs, self.targets = name, *batch
        context = MethodContext(seed=0, steps_per_epoch=10_000, epochs=1)
        config = method_config(name, args) if name != "dense" else None
        if config is not None:
            model = method_class(config.method).prepare_model(config, model, context)
        self.model = model
        self.backend = Backend(DistEnv(), torch.device("cpu"))
        self.backend.wrap(model)
        self.optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                                                            weight_decay=5e-4))
        self.method = build_method(config, model, self.optimizer, context) if config is not None else None
        if self.method is not None:
            self.method.setup()
        self.period = args.period
        self.count = 0

    def hooks(self, step: int) -> None:
        """The method's part of a step (gradients are in place from the last backward)."""
        if self.method is not None:
            self.method.before_step(step)
            self.method.after_step(step)

    def step(self) -> None:
        """A plain step: never an update step (the count skips them; updates are timed by ``update_cost``)."""
        if (self.count + 1) % self.period == 0:
            self.count += 1
        loss = nn.functional.cross_entropy(self.model(self.inputs), self.targets)
        self.backend.backward(loss)
        self.backend.step(self.optimizer, lambda: self.method.before_step(self.count) if self.method else None)
        if self.method is not None:
            self.method.after_step(self.count)
        self.count += 1

    def update_cost(self, repeats: int) -> float:
        """Seconds an update step's hooks take beyond a plain step's (0 for methods with no periodic update)."""
        if self.method is None:
            return 0.0
        loss = nn.functional.cross_entropy(self.model(self.inputs), self.targets)
        self.backend.backward(loss)
        plain = median_seconds(lambda: self.hooks(self.period), repeats)            # t = period + 1: no update
        cycle = iter(range(1, repeats + 2))
        update = median_seconds(lambda: self.hooks(next(cycle) * self.period - 1), repeats)
        return max(0.0, update - plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn28_2")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--period", type=int, default=100)
    parser.add_argument("--target-pruned", type=int, default=2000, help="DSR's N_p")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--update-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = models.build_model(args.model, in_channels=3, image_size=32, num_classes=10)
    batch = (torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,)))
    variants = {name: Variant(name, copy.deepcopy(base), batch, args)
                for name in ["dense", *args.methods.split(",")]}
    times, _ = interleaved({name: v.step for name, v in variants.items()}, args.rounds, args.warmup)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.model} 32 px, batch {args.batch_size}, "
          f"density {args.density}, update every {args.period} steps, {args.rounds} interleaved rounds, fp32")
    print(f"{'method':<12} {'ms/step':>9} {'steps/s':>8} {'update ms':>10} {'vs dense':>9} {'IQR of ratios':>15}")
    for name, variant in variants.items():
        update = variant.update_cost(args.update_repeats)
        extra = update / args.period
        step_s = statistics.median(times[name]) + extra
        ratio, low, high = ratio_stats(times["dense"], [t + extra for t in times[name]])
        print(f"{name:<12} {1000 * step_s:>9.1f} {1 / step_s:>8.3f} {1000 * update:>10.1f} {ratio:>9.3f} "
              f"{low:>7.3f}..{high:.3f}")


if __name__ == "__main__":
    main()

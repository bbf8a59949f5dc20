"""Images per second on ImageNet-shaped data: dense vs a static mask vs random regrowth through the MaskSet.

ResNet-50 and ViT-S/16 at 224 px, 1000 classes, synthetic batches (this measures the model and the mask machinery,
not a data pipeline). Variants, each its own copy of the same model, stepped exactly as the trainer steps them
(forward, backward, ``before_step`` masking the gradients, SGD with momentum):

- dense: no masks;
- static: a random ERK mask at ``--density``, fixed;
- regrow: the static mask plus, every ``--update-every`` steps, a drop-and-grow of ``--regrow-fraction`` of each
  layer's kept weights chosen by a generator seeded by (seed, step, layer) and applied with ``MaskSet.update``
  (zero dropped weights, zero grown ones and their momentum, refresh the gradient factors, check agreement).

Steps are interleaved round-robin (order rotating every round) and ratios are medians of per-round ratios to the
dense step of the same round, as in ``benchmarks.masked_step``. The regrow variant performs its mask update on its
own steps whenever the step count reaches a multiple of ``--update-every``; with fewer rounds than that, the update is
also timed on its own and its cost per step (update / every) is reported, so a short CPU run still shows what a
long run pays. A measurement script, not a test.

    python3 -m benchmarks.throughput                                  # both models, batch 8, 6 rounds
    python3 -m benchmarks.throughput --models resnet50 --batch-size 32 --rounds 20 --channels-last
    python3 -m benchmarks.throughput --device cuda --batch-size 256 --channels-last   # timed with CUDA events

The device is CUDA when one is visible (``--device auto``), else the CPU; on CUDA every timing waits for the device
(CUDA events, ``benchmarks.timing``), so the figures are work done, not launches queued.
"""

import argparse
import copy
import statistics

import torch
from torch import nn

import models
from benchmarks.timing import interleaved, median_seconds, ratio_stats
from engine.backends import Backend, DistEnv
from engine.optim import OptimConfig, build_optimizer
from pruning.agreement import seeded_generator
from pruning.masks import MaskSet
from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig

CLASSES = 1000


def regrowth_masks(masks: MaskSet, step: int, fraction: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """New masks: ``fraction`` of each layer's kept weights dropped, as many pruned ones grown, at seeded positions."""
    new = {}
    for name, mask in masks.items():
        gen = seeded_generator(seed, step, name)
        flat = mask.reshape(-1)
        kept, pruned = flat.nonzero().view(-1), (~flat).nonzero().view(-1)
        k = min(int(fraction * kept.numel()), pruned.numel())
        if k == 0:
            continue
        drop = kept[torch.randperm(kept.numel(), generator=gen)[:k]]
        grow = pruned[torch.randperm(pruned.numel(), generator=gen)[:k]]
        changed = flat.clone()
        changed[drop] = False
        changed[grow] = True
        new[name] = changed.view_as(mask)
    return new


class Variant:
    """One model copy with its optimizer and (for sparse variants) its masks; ``step`` runs one training step."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace,
                 sparse: bool, regrow: bool) -> None:
        self.model, self.inputs, self.targets, self.args, self.regrow = model, inputs, targets, args, regrow
        self.backend = Backend(DistEnv(), inputs.device)
        self.backend.wrap(model)
        self.optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4))
        self.method = None
        if sparse:
            cfg = AtInitConfig(method="random", density=args.density, scope="layer", distribution="erk")
            self.method = build_method(cfg, model, self.optimizer, MethodContext())
            self.method.setup()
        self.count = 0

    def choose(self) -> dict[str, torch.Tensor]:
        """The random drop/grow choice (a real method would score instead)."""
        return regrowth_masks(self.method.masks, self.count, self.args.regrow_fraction)

    def apply(self, new: dict[str, torch.Tensor]) -> None:
        """The MaskSet's part: zero dropped and grown weights and their momentum, refresh factors, check."""
        self.method.masks.update(new, optimizer=self.optimizer)

    def update_masks(self) -> None:
        """The regrowth event."""
        self.apply(self.choose())

    def step(self) -> None:
        loss = nn.functional.cross_entropy(self.model(self.inputs), self.targets)
        self.backend.backward(loss)
        before = (lambda: self.method.before_step(self.count)) if self.method else (lambda: None)
        self.backend.step(self.optimizer, before)
        self.count += 1
        if self.regrow and self.count % self.args.update_every == 0:
            self.update_masks()


def build_variants(name: str, args: argparse.Namespace) -> dict[str, Variant]:
    torch.manual_seed(0)
    base = models.build_model(name, in_channels=3, image_size=224, num_classes=CLASSES).to(args.device)
    inputs = torch.randn(args.batch_size, 3, 224, 224, device=args.device)
    targets = torch.randint(0, CLASSES, (args.batch_size,), device=args.device)
    if args.channels_last and name.startswith("resnet"):
        base = base.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return {label: Variant(copy.deepcopy(base), inputs, targets, args, sparse, regrow)
            for label, sparse, regrow in (("dense", False, False), ("static", True, False), ("regrow", True, True))}


def measure(name: str, args: argparse.Namespace) -> None:
    """Interleaved rounds for one model; prints a table of images/s and ratios to dense."""
    variants = build_variants(name, args)
    names = list(variants)
    times, _ = interleaved({label: variant.step for label, variant in variants.items()}, args.rounds, args.warmup,
                           device=args.device)
    regrow = variants["regrow"]
    choice = median_seconds(regrow.choose, args.update_repeats, device=args.device)
    new = regrow.choose()
    apply = median_seconds(lambda: regrow.apply(new), args.update_repeats, device=args.device)
    update = choice + apply
    per_step_update = update / args.update_every
    dense = times["dense"]
    print(f"\n{name}, 224 px, batch {args.batch_size}, density {args.density} (random ERK), "
          f"{args.rounds} interleaved rounds, channels_last {args.channels_last and name.startswith('resnet')}")
    print(f"{'variant':<8} {'ms/step':>9} {'images/s':>9} {'vs dense':>9} {'IQR of ratios':>15}")
    for label in names:
        step_s = statistics.median(times[label])
        if label == "regrow":
            step_s += per_step_update if args.rounds < args.update_every else 0.0
        extra = per_step_update if label == "regrow" and args.rounds < args.update_every else 0.0
        ratio, low, high = ratio_stats(dense, [t + extra for t in times[label]])
        print(f"{label:<8} {1000 * step_s:>9.1f} {args.batch_size / step_s:>9.2f} {ratio:>9.3f} "
              f"{low:>7.3f}..{high:.3f}")
    print(f"regrowth update ({args.regrow_fraction:.0%} of kept weights per layer): {1000 * update:.1f} ms each "
          f"(random choice {1000 * choice:.1f} ms, MaskSet.update {1000 * apply:.1f} ms), "
          f"{1000 * per_step_update:.2f} ms per step at one per {args.update_every} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_s16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--update-every", type=int, default=100)
    parser.add_argument("--regrow-fraction", type=float, default=0.01)
    parser.add_argument("--update-repeats", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true", help="ResNet weights and inputs in channels_last")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="auto (cuda when visible, else cpu), cpu, cuda, cuda:N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads, SGD momentum 0.9 "
          "(fused kernel), fp32")
    for name in args.models.split(","):
        measure(name, args)


if __name__ == "__main__":
    main()

"""What Synaptic Stripping costs: the decision pass against the same evaluation without hooks, and a training step of
a stripping run against a plain run. One script, one process, ratios from interleaved rounds.

Everything runs through the trainer on CIFAR-shaped synthetic data (3 x 32 x 32, 10 classes), vit_strip at the
published size unless told otherwise:

- **decision pass**: ``Trainer.evaluate`` over the test split with the method's probes hooked on every MLP ReLU, the
  sums reduced and handed to ``decide`` (what ``_evaluate_epoch`` adds to an evaluation), against
  ``Trainer.evaluate`` over the same batches without hooks. Goal: under 10% more.
- **training step**: ``Trainer._train_epoch`` (``--train-steps`` steps: forward, backward, ``before_step`` masking,
  AdamW step, ``after_step``) of a synaptic_stripping trainer whose masks already cut ``--cut`` of the MLP weights
  (so the gradient multiply runs, as after some strips), against a dense trainer from the same seed. Goal: no
  difference beyond noise. Stripping itself happens once an epoch and is not part of a step.

Each round runs both variants of a pair, order rotating (benchmarks/timing.py); the ratio reported is the median of
per-round ratios with its quartiles. A measurement script, not a test.

    python3 -m benchmarks.stripping                                    # CPU: batch 32, 2 eval batches, 2 steps
    python3 -m benchmarks.stripping --batch-size 128 --eval-batches 20 --train-steps 10 --rounds 10   # a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from typing import Any

import torch

from benchmarks.timing import interleaved, ratio_stats
from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer


def make_trainer(args: argparse.Namespace, out: str, method: str) -> Trainer:
    batches = max(args.eval_batches, args.train_steps)
    overrides = [f"output_dir={out}", f"name={method}", "data.name=synthetic", "data.options.image_size=32",
                 f"data.options.train_size={args.batch_size * batches}",
                 f"data.options.test_size={args.batch_size * args.eval_batches}", f"data.batch_size={args.batch_size}",
                 "model.name=vit_strip", f"model.options.dim={args.dim}", f"model.options.depth={args.depth}",
                 f"model.options.heads={args.heads}", "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=5e-5",
                 "train.epochs=2", f"train.max_steps_per_epoch={args.train_steps}", f"train.device={args.device}",
                 f"train.precision={args.precision}", "monitor.progress=false", "monitor.tensorboard=false",
                 "checkpoint.save_final=false", f"sparsity.method={method}"]
    if method == "synaptic_stripping":
        overrides.append("sparsity.split=test")
    cfg = load_config(None, overrides)
    env = DistEnv.from_environ()
    return Trainer(cfg, build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision))


def decision_pass(trainer: Trainer) -> Any:
    """The method's pass over the test split, as _evaluate_epoch runs it: hooks, the evaluation, reduce, decide."""
    request = trainer.method.decision_pass(0)
    hooks, routes = trainer._plan_hooks([request])
    sums: dict[str, torch.Tensor] = {}
    trainer.evaluate(trainer.loaders.test, probes=hooks["test"], sums=sums)
    totals = trainer._reduce_sums(hooks, sums)
    request.decide({name: totals[key] for name, key in routes[0].items()})


def cut_some(trainer: Trainer, fraction: float) -> int:
    """Cut ``fraction`` of every MLP weight at random through the MaskSet (as strips would), so masking runs."""
    generator = torch.Generator().manual_seed(0)
    masks = {name: (torch.rand(mask.shape, generator=generator) >= fraction).to(mask.device)
             for name, mask in trainer.method.masks.items()}
    trainer.method.masks.update(masks, optimizer=trainer.optimizer)
    return sum(int((~m).sum()) for m in masks.values())


def summarise(times: dict[str, list[float]], reference: str, other: str, per: int) -> dict[str, float]:
    ratio, low, high = ratio_stats(times[other], times[reference])   # above 1: `other` takes longer
    return {f"{reference}_ms": 1000 * statistics.median(times[reference]) / per,
            f"{other}_ms": 1000 * statistics.median(times[other]) / per,
            "ratio": ratio, "ratio_q1": low, "ratio_q3": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--depth", type=int, default=7)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cut", type=float, default=0.05, help="fraction of MLP weights masked in the stripping run")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        strip, plain = make_trainer(args, out, "synaptic_stripping"), make_trainer(args, out, "dense")
        device = strip.device
        cut = cut_some(strip, args.cut)
        evals, _ = interleaved({"evaluate": lambda: strip.evaluate(strip.loaders.test),
                                "decision_pass": lambda: decision_pass(strip)}, args.rounds, args.warmup, device)
        steps, _ = interleaved({"plain_step": plain._train_epoch, "stripping_step": strip._train_epoch},
                               args.rounds, args.warmup, device)
        layers = len(strip.method.layers)
        strip.close()
        plain.close()
    result = {"device": str(device), "torch": torch.__version__, "threads": args.threads,
              "model": f"vit_strip dim {args.dim} depth {args.depth} heads {args.heads}", "precision": args.precision,
              "batch_size": args.batch_size, "eval_batches": args.eval_batches, "train_steps": args.train_steps,
              "rounds": args.rounds, "hooked_layers": layers, "masked_weights": cut,
              "decision_pass": summarise(evals, "evaluate", "decision_pass", args.eval_batches),
              "train_step": summarise(steps, "plain_step", "stripping_step", args.train_steps)}
    print(f"{result['model']}, {args.precision}, batch {args.batch_size}, {device}, torch {torch.__version__}, "
          f"{args.threads} threads, {args.rounds} interleaved rounds; {layers} ReLU layers hooked, "
          f"{cut} MLP weights masked in the stripping run")
    for name, label, unit in (("decision_pass", "evaluation batch: hooks vs none", "evaluate"),
                              ("train_step", "training step: stripping vs plain", "plain_step")):
        row = result[name]
        other = [k for k in row if k.endswith("_ms") and not k.startswith(unit)][0]
        print(f"  {label:<36} {row[unit + '_ms']:8.2f} ms -> {row[other]:8.2f} ms   ratio {row['ratio']:.3f} "
              f"(quartiles {row['ratio_q1']:.3f}..{row['ratio_q3']:.3f})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()

"""Spiking nets: a training step in spikingjelly's multi-step mode against single-step mode, and Grad R's optimizer
step against torch's Adam on the same model, each pair interleaved in one run (ratios are medians of per-round ratios).

Training step: forward (T = 8), rate-MSE loss, backward, Adam step, on the MNIST net (784-800-10, batch 128) and on
the CIFAR-10 net at reduced width (the full one, 256 channels, takes minutes per step on a 2-core CPU). Optimizer
step: the same gradients stepped by torch.optim.Adam and by Grad R's optimizer (penalty 1e-3), with torch's foreach
and fused kernels, and Grad R's compiled step (``compile: true``) against fused Adam, on the full-size MNIST and
CIFAR-10 nets (only parameters and gradients: no forward pass).
A measurement script, not a test; the figures in docs/spiking.md come from it.

    python3 -m benchmarks.spiking                      # the docs' figures
    python3 -m benchmarks.spiking --rounds 5 --conv-width 16 --skip-cifar-optimizer
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from benchmarks.timing import interleaved, ratio_stats
from engine.losses import build_loss
from pruning.methods import method_class
from pruning.methods.grad_rewiring import GradRewiringConfig


def training_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    loss = build_loss("rate_mse")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model(inputs), targets).backward()
        optimizer.step()

    return step


def step_modes(name: str, shape: tuple[int, int, int], batch: int, rounds: int, **options: Any) -> dict[str, Any]:
    """Multi-step against single-step training steps of one net (the same weights)."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(batch, *shape) * 2, torch.arange(batch) % 10
    steps, sizes = {}, {}
    for mode in ("m", "s"):
        torch.manual_seed(0)
        model = models.build_model(name, in_channels=shape[0], image_size=shape[1], num_classes=10, step_mode=mode,
                                   **options)
        steps[mode] = training_step(model, inputs, targets)
        sizes[mode] = sum(p.numel() for p in model.parameters())
    times, _ = interleaved(steps, rounds=rounds, warmup=1)
    speedup, low, high = ratio_stats(times["s"], times["m"])
    return {"model": name, "options": options, "input": [batch, *shape], "params": sizes["m"],
            "multi_step_ms": 1e3 * statistics.median(times["m"]), "single_step_ms": 1e3 * statistics.median(times["s"]),
            "speedup_of_multi_step": speedup, "speedup_quartiles": [low, high]}


def optimizer_steps(name: str, shape: tuple[int, int, int], rounds: int, **options: Any) -> dict[str, Any]:
    """Grad R's step against torch Adam's on the same parameters and gradients, per kernel (foreach, fused)."""
    steps: dict[str, Callable[[], object]] = {}
    params = 0
    for kernel in ("foreach", "fused", "compiled"):
        flags = {"foreach": True} if kernel == "foreach" else {"fused": True}
        config = GradRewiringConfig(method="grad_rewiring", penalty=1e-3, target_sparsity=0.95,
                                    compile=kernel == "compiled")
        for kind in ("adam", "grad_r"):
            if kind == "adam" and kernel == "compiled":
                continue            # compared with fused Adam
            torch.manual_seed(0)
            model = models.build_model(name, in_channels=shape[0], image_size=shape[1], num_classes=10, **options)
            params = sum(p.numel() for p in model.parameters())
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **flags) if kind == "adam" else \
                method_class("grad_rewiring").make_optimizer(
                    config, model, lambda m, flags=flags: torch.optim.Adam(m.parameters(), lr=1e-3, **flags))
            steps[f"{kind}/{kernel}"] = optimizer.step
    times, _ = interleaved(steps, rounds=rounds, warmup=2)     # the compiled step compiles in the warm-up
    out: dict[str, Any] = {"model": name, "options": options, "params": params}
    for kernel in ("foreach", "fused", "compiled"):
        adam = "adam/foreach" if kernel == "foreach" else "adam/fused"
        ratio, low, high = ratio_stats(times[f"grad_r/{kernel}"], times[adam])
        out[kernel] = {"adam_ms": 1e3 * statistics.median(times[adam]),
                       "grad_r_ms": 1e3 * statistics.median(times[f"grad_r/{kernel}"]),
                       "grad_r_over_adam": ratio, "quartiles": [low, high]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--conv-width", type=int, default=32)
    parser.add_argument("--conv-hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-cifar-optimizer", action="store_true", help="no full-size CIFAR-10 optimizer step")
    parser.add_argument("--out", default="docs/spiking_benchmark.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": "2-core CPU VM, shared", "torch": torch.__version__, "threads": args.threads,
                              "rounds": args.rounds}
    result["step_modes"] = [
        step_modes("spiking_mlp", (1, 28, 28), 128, args.rounds),
        step_modes("spiking_conv", (3, 32, 32), 16, max(3, args.rounds // 3), width=args.conv_width,
                   hidden=args.conv_hidden),
    ]
    result["optimizer"] = [optimizer_steps("spiking_mlp", (1, 28, 28), 4 * args.rounds)]
    if not args.skip_cifar_optimizer:
        result["optimizer"].append(optimizer_steps("spiking_conv", (3, 32, 32), args.rounds))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| training step | params | multi-step | single-step | multi-step speed-up (quartiles) |")
    print("| --- | --- | --- | --- | --- |")
    for r in result["step_modes"]:
        print(f"| {r['model']} {r['options'] or ''} batch {r['input'][0]} | {r['params']:,} | "
              f"{r['multi_step_ms']:.1f} ms | {r['single_step_ms']:.1f} ms | {r['speedup_of_multi_step']:.2f}x "
              f"({r['speedup_quartiles'][0]:.2f}-{r['speedup_quartiles'][1]:.2f}) |")
    print("\n| optimizer step | params | Grad R kernel (against torch Adam's) | torch Adam | Grad R | "
          "Grad R / Adam (quartiles) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["optimizer"]:
        for kernel in ("foreach", "fused", "compiled"):
            k = r[kernel]
            label = "compiled (fused)" if kernel == "compiled" else f"{kernel} ({kernel})"
            print(f"| {r['model']} | {r['params']:,} | {label} | {k['adam_ms']:.2f} ms | {k['grad_r_ms']:.2f} ms | "
                  f"{k['grad_r_over_adam']:.2f}x ({k['quartiles'][0]:.2f}-{k['quartiles'][1]:.2f}) |")


if __name__ == "__main__":
    main()

"""What the reliability checks cost, measured in one run: the divergence watch per training step, and the checkpoint
checksum (SHA-256 sidecar plus the finiteness gate) per save and per load.

This is a measurement script, not a test: timings never gate CI. Variants run interleaved, round by round with the
order rotating (benchmarks.timing.interleaved), and every ratio printed is the median of per-round ratios.

    python3 -m benchmarks.reliability_cost divergence                 # ResNet-20, 32 px, batch 128, SGD, 90% sparse
    python3 -m benchmarks.reliability_cost divergence --device cuda   # where the watch must not sync the host
    python3 -m benchmarks.reliability_cost checksum                   # ResNet-50 state + SGD momentum, local disk
    python3 -m benchmarks.reliability_cost masking                    # exact gradient masking vs the 0/1 multiply

divergence: one training step exactly as the trainer runs it (forward, backward, exact gradient masking, SGD step),
without and with the trainer's own ``Trainer._watch_loss`` on every step and its ``_check_divergence`` every
``--log-every`` steps (the log steps, where the host syncs anyway).

checksum: ``save_state`` / ``load_state`` (checksum, sidecar, finiteness, verification) against the same torch.save /
torch.load and atomic write without them, into a temporary directory on local disk.

masking: the gradient masking of one step on ResNet-18's prunable gradients (90% pruned, a NaN in every gradient):
``MaskSet.mask_grads_`` (a bitwise AND, exact) against the 0/1 ``_foreach_mul_`` it replaced (NaN * 0 stays NaN) and
the two obvious exact alternatives, ``torch.where`` and ``masked_fill_``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import types
from collections.abc import Callable

import torch
from torch import nn

import models
from benchmarks.timing import interleaved, median_seconds, ratio_stats, synchronize
from engine import checkpoint as ckpt
from engine.backends import Backend, DistEnv
from engine.optim import OptimConfig, build_optimizer
from engine.trainer import Trainer
from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig


def _report(title: str, reference: str, times: dict[str, list[float]]) -> None:
    print(title)
    print(f"{'variant':<24} {'median ms':>10} {'speed vs ' + reference:>22} {'IQR of ratios':>16}")
    for name, values in times.items():
        ratio, low, high = ratio_stats(times[reference], values)
        print(f"{name:<24} {1000 * statistics.median(values):>10.2f} {ratio:>22.4f} {low:>8.4f}..{high:.4f}")


# ------------------------------------------------------------------------------------------------ divergence


def _watcher(device: torch.device, backend: Backend) -> types.SimpleNamespace:
    """The trainer's divergence state on a stand-in object, so the trainer's own methods run unchanged."""
    watcher = types.SimpleNamespace(device=device, step=0, backend=backend, schedule=types.SimpleNamespace(lr=0.1))
    Trainer._reset_watch(watcher)   # type: ignore[arg-type]
    return watcher


def divergence(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    options = {"stem": "cifar"} if "stem" in models.model_options(args.model) else {}
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    targets = torch.randint(0, 10, (args.batch_size,), device=device)
    steps: dict[str, Callable[[], object]] = {}
    for name in ("plain", "watched"):
        model = models.build_model(args.model, in_channels=3, image_size=args.image_size, num_classes=10,
                                   **options).to(device)
        method = build_method(AtInitConfig(method="magnitude", density=args.density), model, None, MethodContext())
        method.setup()
        backend = Backend(DistEnv(), device)
        backend.wrap(model)
        optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4))
        watcher = _watcher(device, backend) if name == "watched" else None

        def step(model: nn.Module = model, method: object = method, backend: Backend = backend,
                 optimizer: torch.optim.Optimizer = optimizer, watcher: object = watcher) -> None:
            loss = nn.functional.cross_entropy(model(inputs), targets)
            backend.backward(loss)
            if watcher is not None:
                with torch.no_grad():
                    Trainer._watch_loss(watcher, loss.detach())   # type: ignore[arg-type]
                watcher.step += 1
                if watcher.step % args.log_every == 0:
                    Trainer._check_divergence(watcher)             # type: ignore[arg-type]
            backend.step(optimizer, lambda: method.before_step(0))

        steps[name] = step
    times, _ = interleaved(steps, args.rounds, args.warmup, device)
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, density {args.density}, {device}, "
          f"{torch.get_num_threads()} threads, check every {args.log_every} steps, {args.rounds} rounds, "
          f"torch {torch.__version__}")
    _report("training step, without and with the divergence watch:", "plain", times)
    watcher = _watcher(device, Backend(DistEnv(), device))
    loss = torch.tensor(2.3, device=device)

    def watch_only() -> None:
        Trainer._watch_loss(watcher, loss)   # type: ignore[arg-type]
        synchronize(device)

    print(f"the watch alone, per step: {1e6 * median_seconds(watch_only, 200):.1f} us "
          "(a few scalar kernels on the device; no host sync)")


# ------------------------------------------------------------------------------------------------ checksum


def checksum(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = models.build_model(args.model, in_channels=3, image_size=224, num_classes=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():            # a momentum buffer for every parameter, as after the first step
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "step": 100}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    size = len(buffer.getvalue())
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        with_url, without_url = f"{directory}/with.pt", f"{directory}/without.pt"

        def save_plain() -> None:
            out = io.BytesIO()
            torch.save(state, out)
            ckpt._atomic_write(without_url, out.getbuffer())

        saves = {"save, plain": save_plain, "save, checksummed": lambda: ckpt.save_state(with_url, state)}
        save_times, _ = interleaved(saves, args.rounds, args.warmup)
        loads = {"load, plain": lambda: torch.load(io.BytesIO(ckpt._read_bytes(without_url)), weights_only=True),
                 "load, verified": lambda: ckpt.load_state(with_url)}
        load_times, _ = interleaved(loads, args.rounds, args.warmup)
        data = ckpt._read_bytes(with_url)
        import hashlib
        sha = median_seconds(lambda: hashlib.sha256(data).hexdigest(), 10)
        finite = median_seconds(lambda: ckpt.all_finite(state), 10)
    print(f"{args.model} state with SGD momentum: {size / 1e6:.1f} MB, {args.rounds} rounds, local disk "
          f"({args.dir or tempfile.gettempdir()}), torch {torch.__version__}")
    _report("save (torch.save + atomic write [+ SHA-256, finiteness, sidecar]):", "save, plain", save_times)
    _report("load (read + torch.load [+ SHA-256 verification]):", "load, plain", load_times)
    print(f"parts alone: SHA-256 of the bytes {1000 * sha:.1f} ms ({size / sha / 1e9:.2f} GB/s), "
          f"finiteness scan {1000 * finite:.1f} ms")


# ------------------------------------------------------------------------------------------------ masking


def masking(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = models.build_model(args.model, in_channels=3, image_size=32, num_classes=10)
    method = build_method(AtInitConfig(method="magnitude", density=args.density), model, None, MethodContext())
    method.setup()
    params = list(method.params.values())
    keeps = [method.masks[name] for name in method.params]
    factors = [keep.to(torch.float32) for keep in keeps]
    pruned = [~keep for keep in keeps]
    zero = torch.zeros(())
    grads = {}

    def fresh() -> None:
        for p in params:
            p.grad = torch.randn_like(p)
            p.grad.view(-1)[0] = float("nan")

    def timed_variant(work: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            fresh()
            start = time.perf_counter()
            work()
            return time.perf_counter() - start
        return run

    grads["multiply (before)"] = timed_variant(lambda: torch._foreach_mul_([p.grad for p in params], factors))
    grads["bitwise AND (now)"] = timed_variant(method.masks.mask_grads_)
    grads["torch.where"] = timed_variant(lambda: [torch.where(k, p.grad, zero, out=p.grad)
                                                  for p, k in zip(params, keeps)])
    grads["masked_fill_"] = timed_variant(lambda: [p.grad.masked_fill_(m, 0.0) for p, m in zip(params, pruned)])
    _, results = interleaved(grads, args.rounds, args.warmup)
    times = {name: [float(t) for t in values] for name, values in results.items()}
    print(f"{args.model}: {sum(p.numel() for p in params) / 1e6:.1f} M prunable weights, density {args.density}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds, torch {torch.__version__}")
    _report("masking the gradients of one step:", "multiply (before)", times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    div = sub.add_parser("divergence", help="steps/s without and with the divergence watch")
    div.add_argument("--model", default="resnet20")
    div.add_argument("--image-size", type=int, default=32)
    div.add_argument("--batch-size", type=int, default=128)
    div.add_argument("--density", type=float, default=0.1)
    div.add_argument("--device", default="cpu")
    div.add_argument("--log-every", type=int, default=10, help="monitor.log_every_steps: where the check runs")
    div.add_argument("--rounds", type=int, default=40)
    div.add_argument("--warmup", type=int, default=3)
    check = sub.add_parser("checksum", help="save and load time without and with the checksum")
    check.add_argument("--model", default="resnet50")
    check.add_argument("--dir", default=None, help="where to write (default: the system's temporary directory)")
    check.add_argument("--rounds", type=int, default=8)
    check.add_argument("--warmup", type=int, default=1)
    mask = sub.add_parser("masking", help="exact gradient masking against the multiply it replaced")
    mask.add_argument("--model", default="resnet18")
    mask.add_argument("--density", type=float, default=0.1)
    mask.add_argument("--rounds", type=int, default=40)
    mask.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    {"divergence": divergence, "checksum": checksum, "masking": masking}[args.what](args)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

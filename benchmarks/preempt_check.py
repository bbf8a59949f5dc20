"""What the per-step preemption agreement costs: one 1-element all-reduce after every optimizer step.

Two gloo ranks on this machine train the same DDP model on synthetic batches, the step timed with and without the
flag all-reduce the trainer adds (``Trainer._step_boundary``). Steps alternate between the two variants so machine
load hits both alike; the ratio is the median of per-pair ratios. A measurement script, not a test.

    python3 -m benchmarks.preempt_check                          # the digits MLP (64-32-10), batch 64
    python3 -m benchmarks.preempt_check --width 1024 --batch-size 256 --steps 200
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _worker(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = torch.randn(args.batch_size, 64), torch.randint(0, 10, (args.batch_size,))

    pending: list = []

    def step(check: str) -> float:
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if check == "sync":
            flag = torch.zeros(1)
            dist.all_reduce(flag)
            bool(flag.item() > 0)
        elif check == "async":
            if pending:
                work, flag = pending.pop()
                work.wait()
                bool(flag.item() > 0)
            flag = torch.zeros(1)
            pending.append((dist.all_reduce(flag, async_op=True), flag))
        return time.perf_counter() - started

    for _ in range(10):
        step("sync")
    times: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
    ratios: dict[str, list[float]] = {"sync": [], "async": []}
    for i in range(args.steps):
        # the async vote overlaps the next step; run a block of them so each waits on its predecessor
        order = ("none", "sync", "async") if i % 2 == 0 else ("async", "sync", "none")
        this = {}
        for kind in order:
            this[kind] = statistics.median(step(kind) for _ in range(3))
            if kind == "async" and pending:
                pending.pop()[0].wait()
        for kind, value in this.items():
            times[kind].append(value)
        for kind in ratios:
            ratios[kind].append(this[kind] / this["none"])
    if rank == 0:
        out.update({f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()})
        out.update({f"{k}_ratio": statistics.median(v) for k, v in ratios.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, args, out), nprocs=2)
        print(f"2 gloo ranks, MLP 64-{args.width}-10, batch {args.batch_size}, {args.steps} rounds: step "
              f"{out['none_ms']:.3f} ms; with a blocking flag all-reduce {out['sync_ms']:.3f} ms (median ratio "
              f"{out['sync_ratio']:.3f}); with the vote overlapped with the next step {out['async_ms']:.3f} ms "
              f"(median ratio {out['async_ratio']:.3f})")


if __name__ == "__main__":
    main()

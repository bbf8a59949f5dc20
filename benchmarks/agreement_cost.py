"""Cost of checking that every rank holds the same masks, next to one training step of the same model.

The check (pruning.agreement.verify_agreement) computes, per layer, the kept count and a hash of kept positions, then
runs two small all-reduces (MIN, MAX). Run it on one process or under torchrun to include the communication:

    python3 -m benchmarks.agreement_cost
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m benchmarks.agreement_cost
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import models
from benchmarks.timing import median_seconds
from pruning.agreement import mask_checksums, verify_agreement
from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model = models.build_model(args.model, in_channels=3, image_size=args.image_size, num_classes=1000)
    method = build_method(AtInitConfig(method="random", density=args.density), model, None, MethodContext(seed=0))
    method.setup()
    masks = dict(method.masks.items())
    checksum = 1000 * median_seconds(lambda: mask_checksums(masks), args.repeats)
    verify = 1000 * median_seconds(lambda: verify_agreement(masks), args.repeats)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    targets = torch.randint(0, 1000, (args.batch_size,))

    def step() -> None:
        nn.functional.cross_entropy(model(inputs), targets).backward()
        method.before_step(0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    train_step = 1000 * median_seconds(step, max(2, args.repeats // 4))
    if rank == 0:
        world = dist.get_world_size() if distributed else 1
        total = sum(m.numel() for m in masks.values())
        print(f"{args.model} {args.image_size} px, {len(masks)} masked layers, {total:,} prunable weights, density "
              f"{args.density}, world size {world}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print(f"  checksums alone (count + position hash per layer)   {checksum:8.1f} ms")
        print(f"  verify_agreement (checksums + MIN/MAX all-reduce)   {verify:8.1f} ms")
        print(f"  one training step, batch {args.batch_size}                         {train_step:8.1f} ms")
        print(f"  one check costs {verify / train_step:.3f} training steps; the check runs once per mask update")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

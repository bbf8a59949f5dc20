"""Run under torchrun by tests/test_prune_distributed.py: SNIP and GraSP masks on this rank's own batches."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import models
from engine.data import DataConfig, build_loaders
from pruning.methods import MethodContext, build_method
from pruning.methods.grasp import GraSPConfig
from pruning.methods.snip import DataScoredConfig
from pruning.scores import balanced_batches


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loaders = build_loaders(DataConfig(name="digits", batch_size=16, augment="none"), seed=0, rank=rank,
                            world_size=world)
    context = MethodContext(seed=0, rank=rank, world_size=world, batches=lambda: loaders.train)
    result: dict[str, object] = {}
    for cfg in (DataScoredConfig(method="snip", density=0.1, samples_per_class=6),
                GraSPConfig(method="grasp", density=0.1, samples_per_class=6)):
        torch.manual_seed(0)
        model = models.build_model("conv", in_channels=1, image_size=8, num_classes=10, width=8)
        method = build_method(cfg, model, None, context)
        method.setup()   # MaskSet.update checks agreement across ranks and raises on any difference
        result[cfg.method] = method.masks.state_dict()
        seen = balanced_batches(loaders.train, model, cfg.samples_per_class, rank, world)
        result[f"{cfg.method}_samples"] = torch.cat([x.reshape(len(x), -1) for x, _ in seen])
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()   # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

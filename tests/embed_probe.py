"""Short runs that tests/test_embedding.py runs back to back in one process and, each alone, in a fresh process.

``python tests/embed_probe.py KIND OUT_DIR`` runs one kind and saves its final weights and summary to
``OUT_DIR/KIND.pt``; ``run(kind, out_dir)`` does the same in the caller's process. Kinds: ``plain`` (no process
group, no DDP), ``group`` (DDP on a one-rank process group that the caller created beforehand) and ``deepspeed``
(ZeRO 2 on the CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.checkpoint import load_state
from engine.run_config import load_config
from engine.trainer import train

KINDS = ("plain", "group", "deepspeed")

COMMON = ["data.name=digits", "data.batch_size=32", "model.name=mlp", "model.options.hidden=[32]",
          "sparsity.method=magnitude", "sparsity.density=0.3", "train.epochs=2", "train.max_steps_per_epoch=4",
          "train.device=cpu", "monitor.progress=false", "monitor.tensorboard=false", "optim.name=adamw",
          "optim.lr=0.01", "optim.weight_decay=0.01"]
BACKEND = {"plain": ["parallel.backend=none"], "group": ["parallel.backend=ddp"],
           "deepspeed": ["parallel.backend=deepspeed", "parallel.zero_stage=2"]}


def make_group() -> None:
    """A one-rank gloo group made by the caller (as Ray Train or a notebook would), with no rendezvous."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def run(kind: str, out_dir: str) -> dict[str, Any]:
    """Train ``kind`` into ``out_dir/kind`` and return its summary and final weights."""
    cfg = load_config(None, [*COMMON, *BACKEND[kind], f"output_dir={out_dir}", f"name={kind}"])
    summary = train(cfg)
    checkpoints = sorted((Path(summary["run_dir"]) / "checkpoints").glob("ckpt-*.pt"))
    state = load_state(str(checkpoints[-1]))
    return {"test_acc": summary["test_acc"], "test_loss": summary["test_loss"], "model": state["model"],
            "masks": state["masks"]}


def main(kind: str, out_dir: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if kind == "group":
        make_group()
    result = run(kind, out_dir)
    if kind == "group":
        dist.destroy_process_group()
    torch.save(result, f"{out_dir}/{kind}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

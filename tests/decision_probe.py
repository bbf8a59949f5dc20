"""Run under torchrun by tests/test_embedding.py: a decision pass and a callback's stop on two ranks.

Each rank sees its own shard, so the pass's per-rank sums differ; ``decide`` must get the same totals on both. A
callback that asks to stop on rank 1 only must not split the ranks: rank 0 decides for all.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import torch

from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer
from pruning.methods import DecisionPass


class StopOnRankOne:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        return self.rank == 1


def main(out_dir: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    env = DistEnv.from_environ()
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    decided: list[list[float]] = []
    try:
        trainer = Trainer(cfg, backend, callbacks=[StopOnRankOne(env.rank)])
        trainer.method.decision_pass = lambda epoch: DecisionPass(
            split="val", probes={"classifier": lambda out: torch.tensor([float(out.shape[0]), float(out.sum())])},
            decide=lambda sums: decided.append(sums["classifier"].tolist()))
        summary = trainer.fit()
        with open(f"{out_dir}/rank{env.rank}.json", "w") as handle:
            json.dump({"decided": decided, "epochs": summary["epochs"], "val_size": len(trainer.loaders.val.dataset)
                       if hasattr(trainer.loaders.val, "dataset") else None}, handle)
        trainer.close()
        del trainer
        backend.barrier()
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

"""Run under torchrun by tests/test_distributed.py: train, then dump this rank's weights and masks for comparison."""

from __future__ import annotations

import sys

import torch

from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer


def main(out_dir: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    env = DistEnv.from_environ()
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    try:
        trainer = Trainer(cfg, backend)
        summary = trainer.fit()
        masks = trainer.method.masks.state_dict() if trainer.method.masks is not None else {}
        torch.save({"model": trainer.model.state_dict(), "masks": masks, "summary_steps": summary["steps"],
                    "world_size": summary["world_size"]}, f"{out_dir}/rank{env.rank}.pt")
        backend.barrier()
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

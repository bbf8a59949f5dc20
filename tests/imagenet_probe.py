"""Run under torchrun by tests/test_imagenet_models.py: several short training runs in one launch (process start,
torch and DeepSpeed imports cost more than two steps of a model).

Usage: imagenet_probe.py OUT_DIR SCENARIO [SCENARIO ...], a scenario being ``label:key=value,key=value,...``.
Each run writes OUT_DIR/<label>-rank<r>.json: its summary, whether every weight is finite, and a checksum of the
masks (ranks must agree).
"""

import json
import sys

import torch

from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer


def run(out_dir: str, scenario: str) -> None:
    """Train one scenario on this rank and record what the test checks."""
    label, _, overrides = scenario.partition(":")
    cfg = load_config(None, overrides.split(","))
    env = DistEnv.from_environ()
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    trainer = Trainer(cfg, backend)
    summary = trainer.fit()
    backend.barrier()
    masks = trainer.method.masks
    record = {
        "summary": {k: v for k, v in summary.items() if k != "layers"},
        "finite": all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()),
        "mask_sum": sum(int(m.sum()) for _, m in masks.items()) if masks is not None else None,
        "mask_hash": sum(int((m.reshape(-1).nonzero().view(-1) % 9973).sum()) for _, m in masks.items())
        if masks is not None else None,
    }
    with open(f"{out_dir}/{label}-rank{env.rank}.json", "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    for item in sys.argv[2:]:
        run(sys.argv[1], item)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()   # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()

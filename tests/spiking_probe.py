"""Run under torchrun by tests/test_spiking_distributed.py: spiking nets under Grad R and spiking Deep R on two ranks
that see different batches (DDP, and Grad R under DeepSpeed ZeRO 0), then dump each rank's weights, theta, masks and
optimizer state.

Usage: spiking_probe.py OUT_DIR"""

from __future__ import annotations

import gc
import sys

import torch

from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer

COMMON = ["data.name=digits", "data.batch_size=32", "model.name=spiking_mlp", "model.options.hidden=64",
          "optim.name=adam", "optim.lr=0.01", "optim.weight_decay=0", "lr_schedule.name=constant",
          "train.loss=rate_mse", "train.epochs=2", "train.max_steps_per_epoch=12", "monitor.progress=false",
          "monitor.tensorboard=false", "checkpoint.every_epochs=100", "checkpoint.save_final=false"]
RUNS = {
    "grad_r": ["sparsity.method=grad_rewiring", "sparsity.penalty=0.05", "sparsity.target_sparsity=0.9"],
    "deep_r": ["sparsity.method=deep_r", "sparsity.style=spiking", "sparsity.density=0.5", "sparsity.l1=0.05",
               "sparsity.temperature=1e-4"],
    "grad_r_zero0": ["sparsity.method=grad_rewiring", "sparsity.penalty=0.05", "sparsity.target_sparsity=0.9",
                     "parallel.backend=deepspeed", "parallel.zero_stage=0"],
}


def run(out_dir: str, name: str, overrides: list[str]) -> None:
    cfg = load_config(None, [*COMMON, *overrides, f"output_dir={out_dir}", f"name={name}"])
    env = DistEnv.from_environ()
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    trainer = Trainer(cfg, backend)
    first_inputs, _ = next(iter(trainer.loaders.train))
    summary = trainer.fit()
    params = dict(trainer.model.named_parameters())
    optimizer = trainer.optimizer
    theta = {key: optimizer.theta(params[key]).clone() for key in trainer.method.params} \
        if hasattr(optimizer, "theta") else {}
    state = {key: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
             for key, p in params.items()}
    torch.save({"model": trainer.backend.model_state_dict(), "masks": trainer.method.masks.state_dict(),
                "theta": theta, "optimizer": state, "metrics": trainer.method.metrics(), "steps": summary["steps"],
                "first_batch": first_inputs, "firing_rate": summary["spikes/firing_rate/lif1"]},
               f"{out_dir}/rank{env.rank}-{name}.pt")
    trainer.close()


def main(out_dir: str) -> None:
    env = DistEnv.from_environ()
    backend = None
    try:
        for name, overrides in RUNS.items():
            run(out_dir, name, overrides)
        gc.collect()    # free the runs' wrappers while the process group they hold is still alive
        backend = build_backend(load_config(None, []).parallel, env, torch.device("cpu"), "fp32")
        backend.barrier()
    finally:
        if backend is not None:
            backend.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])

"""Run under torchrun by tests/test_dst.py: SET, RigL, DSR and Deep R on two ranks that see different batches, then a SET
variant that makes a rank-local choice on rank 1 and must stop with MaskDisagreementError.

Usage: dst_probe.py OUT_DIR [ddp|zero2] (zero2: the DeepSpeed backend with ZeRO stage 2)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Mapping

import torch

from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer
from pruning.agreement import MaskDisagreementError
from pruning.methods import register_method
from pruning.methods.dst import SET

COMMON = ["data.name=digits", "data.batch_size=32", "model.name=mlp", "model.options.hidden=[64,32]",
          "optim.lr=0.1", "optim.weight_decay=5e-4", "train.epochs=10", "monitor.progress=false",
          "monitor.tensorboard=false", "checkpoint.every_epochs=100", "checkpoint.save_final=false",
          "sparsity.density=0.1"]
METHODS = {
    "set": ["sparsity.method=set", "sparsity.period=3"],
    "rigl": ["sparsity.method=rigl", "sparsity.period=3"],
    "dsr": ["sparsity.method=dsr", "sparsity.period=3", "sparsity.period_epochs=[]", "sparsity.periods=[]",
            "sparsity.target_pruned=40"],
    "deep_r": ["sparsity.method=deep_r", "sparsity.temperature=1e-6", "sparsity.l1=1e-4"],
    "rigl_one": ["sparsity.method=rigl", "sparsity.period=3", "train.epochs=1", "train.max_steps_per_epoch=3"],
}


@register_method("set_rank_local")
class RankLocalSET(SET):
    """A deliberately broken SET: rank 1 grows from an unseeded generator, so its masks drift from rank 0's."""

    def grow_scores(self, step: int, name: str, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.context.rank == 1:
            return torch.rand(self.params[name].shape, generator=torch.Generator().manual_seed(12345 + step))
        return super().grow_scores(step, name, grads)


BACKENDS = {"ddp": [], "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"]}


def run(out_dir: str, name: str, overrides: list[str]) -> None:
    cfg = load_config(None, [*COMMON, *overrides, f"output_dir={out_dir}", f"name={name}"])
    env = DistEnv.from_environ()
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    trainer = Trainer(cfg, backend)
    first_inputs, _ = next(iter(trainer.loaders.train))
    try:
        summary = trainer.fit()
    except MaskDisagreementError as error:
        with open(f"{out_dir}/rank{env.rank}-{name}.txt", "w") as handle:
            handle.write(str(error))
        return
    weights = trainer.backend.model_state_dict()       # under ZeRO: the gathered fp32 masters (every rank calls it)
    torch.save({"model": weights, "masks": trainer.method.masks.state_dict(),
                "metrics": trainer.method.metrics(), "steps": summary["steps"], "acc": summary["test_acc"],
                "first_batch": first_inputs}, f"{out_dir}/rank{env.rank}-{name}.pt")


def main(out_dir: str, backend_name: str) -> None:
    env = DistEnv.from_environ()
    backend = None
    extra = BACKENDS[backend_name]
    try:
        for name, overrides in METHODS.items():
            run(out_dir, name, [*overrides, *extra])
        if backend_name == "zero2":      # RigL's dense-gradient gather under ZeRO 1 too (one update, cheap)
            run(out_dir, "rigl_one_zero1", [*METHODS["rigl_one"], *extra, "parallel.zero_stage=1"])
        run(out_dir, "broken", ["sparsity.method=set_rank_local", "sparsity.period=3", *extra])
        gc.collect()    # free the runs' DDP wrappers while the process group they hold is still alive
        backend = build_backend(load_config(None, []).parallel, env, torch.device("cpu"), "fp32")
        backend.barrier()
    finally:
        if backend is not None:
            backend.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")

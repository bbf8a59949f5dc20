"""Run under torchrun by tests/test_stripping_distributed.py: one strip on two ranks whose data disagree.

For the backend named on the command line (ddp, or deepspeed = ZeRO 2): build the trainer, take one training step
(Adam moments everywhere), then plant block 0's fc1 so that each of its neurons fires on its single strongest token
of the held-out split, which lives on one rank only (so each rank alone would call the other rank's neurons dead),
and its first four neurons never fire. Record each rank's own dead neurons (a local pass, sums not reduced), run the
trainer's decision pass and the method's end_epoch, and save per rank: local and decided dead neurons, masks, the
weights before and after, and the gathered fp32 weights and Adam moments (the masters under ZeRO).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer
from pruning.neurons import relu_sums

PLANTED_DEAD = 4


def plant(trainer: Trainer) -> None:
    """fc1 of block 0: bias so that each neuron's largest pre-activation over the whole val split is 1e-2."""
    fc1 = trainer.model.blocks[0].mlp.fc1
    peak = torch.full((fc1.out_features,), -float("inf"))
    handle = fc1.register_forward_hook(lambda m, i, out: peak.copy_(torch.maximum(peak, out.amax(dim=(0, 1)))))
    trainer.evaluate(trainer.loaders.val)
    handle.remove()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    with torch.no_grad():
        fc1.bias.sub_(peak - 1e-2)
        fc1.bias[:PLANTED_DEAD] -= 10.0


def run(backend_name: str, out_dir: str, overrides: list[str]) -> None:
    cfg = load_config(None, [*overrides, f"parallel.backend={backend_name}", f"name={backend_name}"]
                      + (["parallel.zero_stage=2"] if backend_name == "deepspeed" else []))
    env = DistEnv.from_environ()
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    try:
        trainer = Trainer(cfg, backend)
        method = trainer.method
        trainer._train_epoch()                       # one step (max_steps_per_epoch=1): Adam moments exist
        plant(trainer)
        local: dict[str, torch.Tensor] = {}
        trainer.evaluate(trainer.loaders.val, probes={l.relu: (l.relu, relu_sums) for l in method.layers},
                         sums=local)
        decided: dict[str, torch.Tensor] = {}
        decide = method._decide

        def spy(sums: dict[str, torch.Tensor]) -> None:
            decided.update({name: (value == 0) for name, value in sums.items()})
            decide(sums)

        method._decide = spy
        before = {name: p.detach().clone() for name, p in method.params.items()}
        trainer._evaluate_epoch(evaluate=True)
        method.end_epoch(0)
        names = [name for name, _ in trainer.model.named_parameters()]
        full_state = trainer.backend.optimizer_state_dict(trainer.optimizer)["state"]
        masters = trainer.backend.model_state_dict()
        torch.save({"local": {n: (v == 0) for n, v in local.items()}, "decided": decided,
                    "layers": [(l.linear, l.relu) for l in method.layers],
                    "masks": method.masks.state_dict(), "before": before,
                    "after": {name: p.detach().clone() for name, p in method.params.items()},
                    "masters": {name: masters[name] for name in method.params},
                    "moments": {name: {k: v for k, v in full_state[names.index(name)].items() if torch.is_tensor(v)}
                                for name in method.params},
                    "stripped": method.metrics()["stripped"]},
                   f"{out_dir}/{backend_name}-rank{env.rank}.pt")
        trainer.close()
        del trainer, method
        backend.barrier()
    finally:
        backend.shutdown()


if __name__ == "__main__":
    run(sys.argv[2], sys.argv[1], sys.argv[3:])

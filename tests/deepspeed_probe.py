"""Run under torchrun by tests/test_deepspeed.py: several training runs in one launch (DeepSpeed imports slowly).

Usage: deepspeed_probe.py OUT_DIR SCENARIO [SCENARIO ...], a scenario being ``label:key=value,key=value,...``
(overrides of a shared base config). Each run dumps, per rank, its gathered fp32 master weights, masks, summary and
the result of the checks made right after every prune/grow (``probe_churn``) into OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.backends import Backend, DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer
from pruning.agreement import seeded_generator
from pruning.methods.at_init import AtInitConfig, RandomPruning
from pruning.methods.base import register_method


def full_master(backend: Backend, model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 weights as the optimizer steps them: DeepSpeed's gathered master partitions, else the parameters."""
    from deepspeed.utils import safe_get_full_fp32_param  # only the probe reaches into DeepSpeed directly

    out = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param) if hasattr(param, "_hp_mapping") else None
        out[name] = (full if full is not None else param.detach()).float().cpu().clone()
    return out


def full_optimizer_state(backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer,
                         param: nn.Parameter) -> list[torch.Tensor]:
    """Every per-element optimizer state tensor of ``param``, gathered whole."""
    from deepspeed.utils import safe_get_full_optimizer_state

    mapping = getattr(param, "_hp_mapping", False)
    if mapping is False:
        return [v for v in optimizer.state.get(param, {}).values() if torch.is_tensor(v) and v.shape == param.shape]
    flat = backend._flat_partitions()[0]      # every state key exists on every rank's partition
    keys = [k for k, v in optimizer.state.get(flat, {}).items() if torch.is_tensor(v) and v.shape == flat.shape]
    return [safe_get_full_optimizer_state(param, k).cpu() for k in keys]


@dataclass
class ChurnConfig(AtInitConfig):
    """Random mask at init, then every ``every`` steps drop ``churn`` kept and grow ``churn`` pruned weights per
    layer (grown weights set to ``grow_value``); every = 0 keeps the mask static."""

    every: int = 2
    churn: int = 4
    grow_value: float = 0.25


@register_method("probe_churn")
class ProbeChurn(RandomPruning):
    """Repeated prune/grow through the MaskSet, checked from outside after each change."""

    Config = ChurnConfig
    config: ChurnConfig
    checker: Any = None      # (masks before, grown positions) after an update; (None, None) after every step

    def after_step(self, step: int) -> None:
        cfg = self.config
        if self.checker is not None:
            self.checker(None, None)          # every step: pruned weights stayed zero through the optimizer step
        if cfg.every == 0 or (step + 1) % cfg.every or self.masks is None:
            return
        new, grown = {}, {}
        for name, mask in self.masks.items():
            gen = seeded_generator(self.context.seed, step, name)
            flat = mask.reshape(-1).cpu()
            kept, pruned = flat.nonzero().view(-1), (~flat).nonzero().view(-1)
            k = min(cfg.churn, kept.numel() - 1, pruned.numel())
            drop = kept[torch.randperm(kept.numel(), generator=gen)[:k]]
            grow = pruned[torch.randperm(pruned.numel(), generator=gen)[:k]]
            updated = flat.clone()
            updated[drop] = False
            updated[grow] = True
            new[name] = updated.view_as(mask).to(mask.device)
            grown[name] = (updated & ~flat).view_as(mask)
        values = {name: torch.full_like(p, cfg.grow_value, dtype=torch.float32) for name, p in self.params.items()}
        old = {name: mask.clone() for name, mask in self.masks.items()}
        self.masks.update(new, optimizer=self.optimizer, grow_values=values)
        if self.checker is not None:
            self.checker(old, grown)


def run(label: str, overrides: list[str], out: dict[str, Any], env: DistEnv) -> None:
    cfg = load_config(None, overrides)
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    trainer = Trainer(cfg, backend)
    record: dict[str, Any] = {"events": 0, "violations": [], "grown_state_max": 0.0, "state_checked": 0,
                              "steps_checked": 0}

    def check(old: dict[str, torch.Tensor] | None, grown: dict[str, torch.Tensor] | None) -> None:
        """Master and module zero where pruned; right after an update also: grown value set, state zeroed."""
        masks = trainer.method.masks
        assert masks is not None
        master = full_master(backend, trainer.model)
        value = trainer.method.config.grow_value
        record["steps_checked" if old is None else "events"] += 1
        for name, mask in masks.items():
            param = masks.params[name]
            for what, tensor in (("master", master[name]), ("module", param.detach().float().cpu())):
                if (tensor[~mask.cpu()] != 0).any():
                    record["violations"].append(f"{what} {name} nonzero where pruned")
                if old is None or grown is None:
                    continue
                if (tensor[grown[name].cpu()] != value).any():
                    record["violations"].append(f"{what} {name} grown weights not set")
            if old is None:
                continue
            touched = (old[name] ^ mask).cpu()
            for state in full_optimizer_state(backend, trainer.model, trainer.optimizer, param):
                if touched.any():
                    record["grown_state_max"] = max(record["grown_state_max"], float(state[touched].abs().max()))
                    record["state_checked"] += 1

    if isinstance(trainer.method, ProbeChurn):
        trainer.method.checker = check
    summary = trainer.fit()
    backend.barrier()        # rank 0 writes checkpoints; the next run may resume from them
    masks = trainer.method.masks
    record.update(master=full_master(backend, trainer.model), summary=summary,
                  masks=masks.state_dict() if masks is not None else {},
                  module={k: v.float().cpu() for k, v in trainer.model.state_dict().items()})
    out[label] = record


def main(out_dir: str, scenarios: list[str]) -> None:
    env = DistEnv.from_environ()
    out: dict[str, Any] = {}
    for scenario in scenarios:
        label, _, spec = scenario.partition(":")
        run(label, [item for item in spec.split(",") if item], out, env)
    torch.save(out, f"{out_dir}/rank{env.rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()   # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

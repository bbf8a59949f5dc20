"""torch DistributedDataParallel: gloo on CPU, NCCL on CUDA; gradients averaged during backward.

The backend joins the process group it finds (made by torchrun's worker code, Ray Train or a test) or creates one,
and on ``shutdown`` destroys only a group it created: a run embedded in a longer-lived process leaves that process's
group as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.backends.base import Backend, DistEnv
from engine.backends.config import ParallelConfig


def dist_backend_name(cfg: ParallelConfig, device: torch.device) -> str:
    """The torch.distributed backend for ``device``: the configured one, or nccl on CUDA and gloo on the CPU."""
    kind = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if kind == "nccl" and device.type != "cuda":
        raise ValueError("parallel.dist_backend nccl needs CUDA; use gloo on the CPU")
    return kind


def init_process_group(cfg: ParallelConfig, env: DistEnv, device: torch.device) -> bool:
    """Join the job's default process group, creating it if nobody has; True when this call created it."""
    kind = dist_backend_name(cfg, device)
    if dist.is_initialized():
        return False
    extra: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # one process started without a launcher: a group of one needs no rendezvous
        extra.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend=kind, timeout=datetime.timedelta(minutes=cfg.timeout_minutes), **extra)
    return True


class DDPBackend(Backend):
    """Wraps the model in DistributedDataParallel; collectives go through the default process group."""

    name = "ddp"
    # attributes holding objects that keep communication state alive (DDP's reducer, DeepSpeed's engine)
    _wrapped_attributes: tuple[str, ...] = ("module",)

    def __init__(self, env: DistEnv, device: torch.device, precision: str, cfg: ParallelConfig) -> None:
        super().__init__(env, device, precision)
        self.cfg = cfg
        self._owns_group = init_process_group(cfg, env, device)

    def wrap(self, model: nn.Module) -> nn.Module:
        self._model = model
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.module = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=self.cfg.find_unused_parameters)
        return self.module

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        assert isinstance(self.module, nn.parallel.DistributedDataParallel)
        return contextlib.nullcontext() if sync else self.module.no_sync()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        """Free the wrapped model, then the process group if this backend created it."""
        self._release_wrapped()
        if self._owns_group and dist.is_initialized():
            self._destroy_group()
        self._owns_group = False

    def _destroy_group(self) -> None:
        """Destroy the default process group (and every group derived from it)."""
        dist.destroy_process_group()

    def _release_wrapped(self) -> None:
        """Drop the wrappers, and collect them now if a reference cycle keeps them alive.

        A DDP reducer (or DeepSpeed engine) that is garbage-collected after its process group is destroyed aborts the
        process ("terminate called without an active exception"). Dropping the last reference frees a wrapper at
        once; only one that survives that (a cycle) needs the collector, so the full collection runs only then.
        """
        refs: list[weakref.ref[Any]] = []
        unknown = False                            # something we cannot watch: collect to be safe
        for attribute in self._wrapped_attributes:
            wrapped = getattr(self, attribute, None)
            if wrapped is None:
                continue
            try:
                refs.append(weakref.ref(wrapped))
            except TypeError:
                unknown = True
            setattr(self, attribute, None)
        wrapped = None
        if unknown or any(ref() is not None for ref in refs):
            gc.collect()

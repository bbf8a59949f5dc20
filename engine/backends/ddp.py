"""torch DistributedDataParallel: gloo on CPU, NCCL on CUDA; gradients averaged during backward.

The backend joins the process group it finds (made by torchrun's worker code, Ray Train or a test) or creates one,
and on ``shutdown`` destroys only a group it created: a run embedded in a longer-lived process leaves that process's
group as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import os
import threading
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.backends.base import Backend, DistEnv, RankLost
from engine.backends.config import ParallelConfig
from engine.errors import RunStopped

# Words in the errors gloo and NCCL raise when a peer stops answering or goes away (gloo raises plain RuntimeErrors
# naming its own source file); kept narrow, so that a local error (a data loader's timeout) is never blamed on a peer.
_COMMUNICATION_WORDS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer")
_backends_made = itertools.count()   # every rank makes the same backends in the same order: a shared tag per run


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


def is_communication_error(error: BaseException) -> bool:
    """True for a failed collective: torch's distributed errors, or a RuntimeError in gloo's or NCCL's words."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error).lower() for word in _COMMUNICATION_WORDS)


def silent_ranks(store: dist.Store, tag: str, rank: int, world_size: int, wait_s: float) -> list[int] | None:
    """The ranks that do not check in through the job's key-value store within ``wait_s`` seconds.

    Every rank that is still alive after a failed collective writes its key and waits for the others'; a frozen or
    dead rank never writes. The store lives outside the failed collective (in torchrun's agent, or rank 0), so it
    still answers. None when the store itself does not answer in time (its host is the rank that stopped).
    """
    found: list[list[int]] = []

    def roll_call() -> None:
        keys = [f"sparsetrain/alive/{tag}/{r}" for r in range(world_size)]
        store.set(keys[rank], "1")
        deadline = time.monotonic() + wait_s
        missing = list(range(world_size))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([keys[r]])]
            if missing:
                time.sleep(0.05)
        found.append(missing)

    caller = threading.Thread(target=roll_call, name="sparsetrain-roll-call", daemon=True)
    caller.start()
    caller.join(wait_s + 5.0)
    return found[0] if found else None


class DDPBackend(Backend):
    """Wraps the model in DistributedDataParallel; collectives go through the default process group."""

    name = "ddp"
    # attributes holding objects that keep communication state alive (DDP's reducer, DeepSpeed's engine)
    _wrapped_attributes: tuple[str, ...] = ("module",)

    def __init__(self, env: DistEnv, device: torch.device, precision: str, cfg: ParallelConfig) -> None:
        super().__init__(env, device, precision)
        self.cfg = cfg
        self._owns_group = init_process_group(cfg, env, device)
        self._tag = str(next(_backends_made))

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

    def explain_failure(self, error: BaseException) -> RunStopped | None:
        """Name the ranks that stopped answering when ``error`` is a failed collective (a roll call through the
        store, at most 30 s or the collective timeout); None for any other error."""
        if not is_communication_error(error) or not dist.is_initialized() or self.env.world_size < 2:
            return None
        timeout = f"parallel.timeout_minutes={self.cfg.timeout_minutes:g}"
        try:
            store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, ValueError):
            return None
        wait_s = min(30.0, 60.0 * self.cfg.timeout_minutes)
        silent = silent_ranks(store, self._tag, self.env.rank, self.env.world_size, wait_s)
        if silent is None:
            who = "the rank that holds the job's store (rank 0) stopped answering"
        elif silent:
            who = f"rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} stopped answering"
        else:
            return None    # everyone is alive: an error of another kind, shown as it is
        return RankLost(f"{who} (frozen, swapped out or dead): a collective on rank {self.env.rank} failed or waited "
                        f"past {timeout}; the job stops; continue from the last checkpoint with resume=auto "
                        "(train --max-restarts N does that by itself)")

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

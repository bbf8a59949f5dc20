"""How the model is run across processes: nothing (one process) or torch DDP.

A backend is the small interface the training loop talks to: wrap the model after it is built, run backward (with
gradient sync only on accumulation boundaries), take the optimizer step (unscale, let the sparsity method mask
gradients, clip, step) and reduce metrics. The DeepSpeed backend implements the same interface, so the loop does
not change. Models contain no parallel code.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ParallelConfig:
    """backend auto = DDP when launched with several processes (torchrun), else a single process."""

    backend: Literal["auto", "none", "ddp"] = "auto"
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False
    timeout_minutes: float = 30.0

    def __post_init__(self) -> None:
        if self.timeout_minutes <= 0:
            raise ValueError(f"timeout_minutes must be positive, got {self.timeout_minutes}")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from the variables torchrun (or deepspeed) sets."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        try:
            return cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start the job with torchrun") from None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """cuda:<local_rank> when CUDA is asked for (or auto and present), else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device is cuda but no CUDA device is visible; set train.device=cpu")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


class Backend:
    """Single process: the model runs as built. Subclasses add communication."""

    name = "none"

    def __init__(self, env: DistEnv, device: torch.device, precision: str = "fp32") -> None:
        self.env = env
        self.device = device
        self.precision = precision
        self.module: nn.Module | None = None
        self._model: nn.Module | None = None
        use_scaler = precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None

    # ---------------------------------------------------------------- model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Take ownership of the built model; returns the module to call in the loop."""
        self._model = model
        self.module = model
        return model

    @property
    def model(self) -> nn.Module:
        """The unwrapped model: masks and checkpoints are keyed by its parameter names."""
        assert self._model is not None, "wrap() the model first"
        return self._model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ---------------------------------------------------------------- step
    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch; sync=False skips gradient communication (accumulation)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, before_step: Callable[[], None],
             clip_grad_norm: float | None = None) -> None:
        """Unscale, mask (``before_step``), clip, step and clear gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        before_step()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ collective
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place) and return the tensor."""
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of ``obj`` on every rank."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def shutdown(self) -> None:
        """Release the process group."""

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class DDPBackend(Backend):
    """torch DistributedDataParallel: gloo on CPU, NCCL on CUDA; gradients averaged during backward."""

    name = "ddp"

    def __init__(self, env: DistEnv, device: torch.device, precision: str, cfg: ParallelConfig) -> None:
        super().__init__(env, device, precision)
        self.cfg = cfg
        kind = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if kind == "nccl" and device.type != "cuda":
            raise ValueError("parallel.dist_backend nccl needs CUDA; use gloo on the CPU")
        if not dist.is_initialized():
            dist.init_process_group(backend=kind, timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
                                    **({"device_id": device} if device.type == "cuda" else {}))

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
        if dist.is_initialized():
            dist.destroy_process_group()


def build_backend(cfg: ParallelConfig, env: DistEnv, device: torch.device, precision: str) -> Backend:
    """The backend the config and the launch environment call for."""
    if cfg.backend == "none" and env.world_size > 1:
        raise ValueError(f"parallel.backend is none but {env.world_size} processes were started; "
                         "set parallel.backend=ddp or start one process")
    if cfg.backend == "ddp" or (cfg.backend == "auto" and env.world_size > 1):
        return DDPBackend(env, device, precision, cfg)
    return Backend(env, device, precision)


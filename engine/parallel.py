"""How the model is run across processes: nothing (one process), torch DDP or DeepSpeed (``engine.deepspeed_backend``).

A backend is the small interface the training loop talks to: wrap the model after it is built, run backward (with
gradient sync only on accumulation boundaries), take the optimizer step (unscale, let the sparsity method mask
gradients, clip, step) and reduce metrics. The DeepSpeed backend implements the same interface, so the loop does
not change. Models contain no parallel code.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from pruning.masks import MaskSet

# DeepSpeed keys sparsetrain writes itself, and the setting that owns each (deepspeed_extra may not override them).
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "data.batch_size and train.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.clip_grad_norm",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "optimizer": "optim",
    "scheduler": "lr_schedule",
}


@dataclass
class ParallelConfig:
    """backend auto = DDP when launched with several processes (torchrun), else a single process.

    ``deepspeed`` needs an explicit choice; ``zero_stage`` and ``deepspeed_extra`` (more DeepSpeed config keys,
    merged into the generated config) apply to it only.
    """

    backend: Literal["auto", "none", "ddp", "deepspeed"] = "auto"
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False
    timeout_minutes: float = 30.0
    zero_stage: int = 2
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.timeout_minutes <= 0:
            raise ValueError(f"timeout_minutes must be positive, got {self.timeout_minutes}")
        if self.zero_stage == 3:
            raise ValueError("zero_stage 3 is refused: ZeRO-3 shards the module weights themselves, so no rank holds "
                             "a whole layer to mask or score; use zero_stage 0, 1 or 2")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.deepspeed_extra and self.backend != "deepspeed":
            raise ValueError(f"deepspeed_extra is set but backend is {self.backend}; set parallel.backend=deepspeed "
                             "or drop deepspeed_extra")
        for key, owner in DEEPSPEED_OWNED_KEYS.items():
            if key in self.deepspeed_extra:
                raise ValueError(f"deepspeed_extra sets {key}, which is generated from {owner}; set that instead")
        zero = self.deepspeed_extra.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError(f"deepspeed_extra must hold a mapping under zero_optimization, got {zero!r}")
        if "stage" in zero:
            raise ValueError("deepspeed_extra sets zero_optimization.stage, which is generated from "
                             "parallel.zero_stage; set that instead")
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                raise ValueError(f"deepspeed_extra sets zero_optimization.{key}, which is refused: masking under "
                                 "ZeRO offload is not verified; train without offload")


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

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, micro_batch_size: int,
                grad_accum_steps: int, clip_grad_norm: float | None
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap model and optimizer together: (module to call in the loop, optimizer the LR schedule drives).

        Backends that only wrap the model ignore the loop's shape; DeepSpeed builds its config from it.
        """
        return self.wrap(model), optimizer

    def attach_masks(self, masks: MaskSet | None) -> None:
        """Give the MaskSet this backend's way to reach weights, gradients and optimizer state (torch's: nothing)."""

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
    def model_state_dict(self) -> dict[str, Any]:
        """Full weights keyed by the unwrapped model's names: the same for every backend, so checkpoints cross."""
        return self.model.state_dict()

    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimizer state in torch's layout (per-parameter entries, indexed in parameter order)."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

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
            extra: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
            if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
                # one process started without a launcher: a group of one needs no rendezvous
                extra.update(store=dist.HashStore(), rank=0, world_size=1)
            dist.init_process_group(backend=kind, timeout=datetime.timedelta(minutes=cfg.timeout_minutes), **extra)

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
        """Free the wrapped model, then the process group.

        A DDP reducer (or DeepSpeed engine) that is garbage-collected after its process group is destroyed aborts the
        process ("terminate called without an active exception"): the trainer that holds it sits in a reference
        cycle, so it is freed only by the collector, at a moment of the collector's choosing. Collect it here first.
        """
        for attribute in ("module", "_optimizer"):
            if hasattr(self, attribute):
                setattr(self, attribute, None)
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def build_backend(cfg: ParallelConfig, env: DistEnv, device: torch.device, precision: str) -> Backend:
    """The backend the config and the launch environment call for."""
    if cfg.backend == "none" and env.world_size > 1:
        raise ValueError(f"parallel.backend is none but {env.world_size} processes were started; "
                         "set parallel.backend=ddp or start one process")
    if cfg.backend == "deepspeed":
        from engine.deepspeed_backend import DeepSpeedBackend   # imported only when asked for: slow to import
        return DeepSpeedBackend(env, device, precision, cfg)
    if cfg.backend == "ddp" or (cfg.backend == "auto" and env.world_size > 1):
        return DDPBackend(env, device, precision, cfg)
    return Backend(env, device, precision)


"""The interface the training loop talks to, and its single-process implementation.

A backend wraps the model after it is built, runs backward (with gradient sync only on accumulation boundaries),
takes the optimizer step (unscale, let the sparsity method mask gradients, clip, step) and reduces metrics. DDP and
DeepSpeed implement the same interface, so the loop does not change; models contain no parallel code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.errors import RunStopped

if TYPE_CHECKING:
    from pruning.masks import MaskSet


class RankLost(RunStopped):
    """A collective failed because a rank stopped answering (frozen, swapped out, killed); the message names it."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from the variables torchrun (or deepspeed) sets."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        """The launcher's view; a process started without one is rank 0 of 1."""
        try:
            return cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start the job with torchrun") from None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """cuda:<local_rank> when CUDA is asked for (or auto and present), else the CPU: one GPU per local rank."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device is cuda but no CUDA device is visible; set train.device=cpu")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


class EnvChanges:
    """Environment variables changed inside ``watch()`` blocks, remembered with their first values to put back.

    Libraries set launcher variables (RANK, WORLD_SIZE, ...) and caches as they start; left behind, they make the
    next run in the same process (a Ray Tune worker runs many) believe it is a torchrun worker.
    """

    def __init__(self) -> None:
        self.original: dict[str, str | None] = {}   # name -> value before the first change (None: was unset)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Record every variable the block sets, changes or removes."""
        before = dict(os.environ)
        try:
            yield
        finally:
            for key in before.keys() | os.environ.keys():
                if before.get(key) != os.environ.get(key):
                    self.original.setdefault(key, before.get(key))

    def adopt(self, other: EnvChanges) -> None:
        """Take over the record of changes made before ours (so its values win), leaving it empty."""
        self.original.update(other.original)
        other.original.clear()

    def restore(self) -> None:
        """Put every recorded variable back as it was (unset where it was unset)."""
        for key, value in self.original.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.original.clear()


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

    def run_files(self) -> dict[str, str]:
        """Files this backend adds to the run directory after ``prepare`` (name -> text); rank 0 writes them."""
        return {}

    def attach_masks(self, masks: MaskSet | None) -> None:
        """Give the MaskSet this backend's way to reach weights, gradients and optimizer state (torch's: nothing)."""

    @property
    def model(self) -> nn.Module:
        """The unwrapped model: masks and checkpoints are keyed by its parameter names."""
        assert self._model is not None, "wrap() the model first"
        return self._model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for the forward pass, or nothing in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ---------------------------------------------------------------- step
    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch; sync=False skips gradient communication (accumulation)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through the (fp16: scaled) loss."""
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
        """Every rank's ``obj``, in rank order."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def shutdown(self) -> None:
        """Undo what this backend did to the process (a single process changes nothing)."""

    def explain_failure(self, error: BaseException) -> RunStopped | None:
        """A one-line account of ``error`` when it is a failed collective (which rank stopped answering), else None:
        a single process has no peers to lose."""
        return None

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
        """The backend's own resumable state: the fp16 loss scaler, if any."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

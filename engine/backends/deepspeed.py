"""DeepSpeed backend: ZeRO stages 0-2, bf16 / fp16, DeepSpeed's own accumulation, clipping and loss scaling.

Masks reach the ZeRO master partitions through ``engine.backends.zero``. Checkpoints hold full tensors in torch's
layout (gathered once per checkpoint), so a DeepSpeed checkpoint loads into the DDP or single-process backend and the
other way round, at any world size.

DeepSpeed is started inside a process that may outlive the run (a Ray Tune worker, a test): the backend remembers the
environment variables it and DeepSpeed set (RANK, LOCAL_RANK, WORLD_SIZE, caches) and puts them back on ``shutdown``,
and, like DDP, destroys only a process group it created.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from engine.backends.base import DistEnv, EnvChanges
from engine.backends.config import ParallelConfig, merge_deepspeed
from engine.backends.ddp import DDPBackend
from engine.backends.zero import ZeroAccess, flat_partitions, gather_groups, scatter_group

if TYPE_CHECKING:
    from pruning.masks import MaskSet


def _rank() -> int:
    """This process's global rank as the launcher set it (0 in a one-process run)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _QuietOtherRanks(logging.Filter):
    """DeepSpeed logs its start-up (accelerator choice, op builds) on every rank; keep rank 0's, and errors from all.

    Rank 0 loses two messages that say nothing the user can act on: DeepSpeed's "untested optimizer" warning (the
    config opts in on purpose: our optimizers are torch's own) and, when DS_ACCELERATOR=cpu chose the CPU, torch's
    "No CUDA runtime is found" from the extension builder DeepSpeed imports.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if _rank() != 0:
            return False
        message = record.getMessage()
        if "untested optimizer" in message:
            return False
        return not ("No CUDA runtime is found" in message and os.environ.get("DS_ACCELERATOR") == "cpu")


# Before the import: DeepSpeed logs while it is imported. Filters survive DeepSpeed's own logger set-up.
for _name in ("DeepSpeed", "torch.utils.cpp_extension"):
    logging.getLogger(_name).addFilter(_QuietOtherRanks())
# DeepSpeed's ZeRO calls an API torch deprecates: nothing a user can change, and "once" does not hold it (it came back
# after every run in a process), so it is dropped; torch's other deprecation warnings still show.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)

# Importing DeepSpeed sets variables too (PYTORCH_NVML_BASED_CUDA_CHECK); the first backend puts them back with its own.
_IMPORT_CHANGES = EnvChanges()
with _IMPORT_CHANGES.watch():
    import deepspeed

DEFAULT_BUCKET = 500_000_000   # DeepSpeed's own default bucket size (elements)


def deepspeed_config(cfg: ParallelConfig, precision: str, *, micro_batch_size: int, grad_accum_steps: int,
                     clip_grad_norm: float | None, model_numel: int) -> dict[str, Any]:
    """The DeepSpeed config for our settings, with the user's keys (``parallel.deepspeed_config``'s file, then
    ``parallel.deepspeed_extra``) merged in, one level deep for sections.

    Buckets are capped at the model's size: DeepSpeed allocates them whole on every micro-step, and its 5e8-element
    default cost 0.4 s per allocation on the CPU for a model a thousand times smaller.
    """
    bucket = max(1, min(DEFAULT_BUCKET, model_numel))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": float(clip_grad_norm or 0.0),
        "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,   # our torch optimizers (fused SGD, AdamW) are plain torch ones
        "steps_per_print": 2**31 - 1,             # the monitor reports; keep DeepSpeed's log quiet
    }
    return merge_deepspeed(config, cfg.deepspeed_keys())


def _forget_stale_groups() -> None:
    """Drop DeepSpeed's cached process groups when they belong to a world that no longer exists.

    DeepSpeed keeps groups derived from the world (a clone of it, expert groups) in module globals. A world destroyed
    with torch's ``destroy_process_group`` (by Ray Train, a test, the user) leaves them stale, and the next
    ``deepspeed.initialize`` fails on them. ``deepspeed.comm.destroy_process_group`` would have dropped them; do what
    it does. (Private DeepSpeed names, looked up defensively: a DeepSpeed without them has nothing to drop here.)
    """
    from deepspeed.utils import groups

    cached = getattr(groups, "_WORLD_GROUP", None)
    release = getattr(groups, "_release_process_group_references", None)
    if cached is None or release is None:
        return
    try:
        dist.get_process_group_ranks(cached)
    except (KeyError, ValueError, RuntimeError):   # not a group of the current world
        release(None)


class DeepSpeedBackend(DDPBackend):
    """deepspeed.initialize owns the step: accumulation boundaries, loss scaling, clipping, the ZeRO partitions."""

    name = "deepspeed"
    # DeepSpeed hooks the model's parameters with closures over its engine: the model keeps the engine alive
    _wrapped_attributes = ("module", "engine", "_optimizer", "_model")

    def __init__(self, env: DistEnv, device: torch.device, precision: str, cfg: ParallelConfig) -> None:
        self._env_changes = EnvChanges()
        self._env_changes.adopt(_IMPORT_CHANGES)
        self._owns_group = False
        try:
            with self._env_changes.watch():
                super().__init__(env, device, precision, cfg)     # torch's process group: gloo on CPU, NCCL on CUDA
                for key, value in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank),
                                   ("WORLD_SIZE", env.world_size)):
                    os.environ.setdefault(key, str(value))        # DeepSpeed reads them; unset in a one-process run
                # it prints ("... built successfully") on every rank: keep rank 0's
                quiet = contextlib.redirect_stdout(io.StringIO()) if env.rank else contextlib.nullcontext()
                with quiet:
                    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
                _forget_stale_groups()
        except BaseException:
            self.shutdown()          # nobody else can: the caller never receives this backend
            raise
        self.scaler = None                                         # DeepSpeed scales fp16 losses itself
        self.engine: Any = None
        self._groups: list[list[nn.Parameter]] = []
        self._boundary = True
        self._partitioned = False
        self._optimizer: torch.optim.Optimizer | None = None
        self.ds_config: dict[str, Any] | None = None

    def run_files(self) -> dict[str, str]:
        """The DeepSpeed config this run used, as ``deepspeed_config.json``: what to hand DeepSpeed to reproduce it."""
        if self.ds_config is None:
            return {}
        return {"deepspeed_config.json": json.dumps(self.ds_config, indent=2, sort_keys=True) + "\n"}

    def shutdown(self) -> None:
        """Free the engine, destroy the process group if this backend created it, and put the environment back.

        ``engine.destroy()`` removes the gradient hooks ZeRO put on the parameters: they close over its optimizer
        from C++ autograd nodes, a cycle the collector cannot see, which would keep every partition alive.
        """
        self._groups = []
        try:
            engine = getattr(self, "engine", None)       # absent when __init__ failed
            if engine is not None:
                engine.destroy()
            del engine
            super().shutdown()
        finally:
            self._env_changes.restore()

    def _destroy_group(self) -> None:
        """Through DeepSpeed, which then also forgets the groups it derived from the world."""
        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        else:
            super()._destroy_group()

    # ---------------------------------------------------------------- model
    def wrap(self, model: nn.Module) -> nn.Module:
        raise TypeError("the DeepSpeed backend wraps model and optimizer together; call prepare(model, optimizer)")

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, micro_batch_size: int,
                grad_accum_steps: int, clip_grad_norm: float | None
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """deepspeed.initialize over the built model and torch optimizer; the torch optimizer stays the one the LR
        schedule drives (DeepSpeed steps it on the master partitions)."""
        self._model = model
        self._optimizer = optimizer
        self._groups = [list(g["params"]) for g in optimizer.param_groups if g["params"]]
        config = deepspeed_config(self.cfg, self.precision, micro_batch_size=micro_batch_size,
                                  grad_accum_steps=grad_accum_steps, clip_grad_norm=clip_grad_norm,
                                  model_numel=sum(p.numel() for p in model.parameters()))
        # DeepSpeed broadcasts parameters as flat bytes and ZeRO flattens them into contiguous buffers: channels_last
        # weights (train.channels_last) fail the first and would lose their layout in the second. Weights stay
        # contiguous; the trainer still feeds channels_last inputs, from which the convolutions pick NHWC kernels.
        for param in model.parameters():   # compare strides: a channels_last 1x1 kernel counts as contiguous
            if param.data.stride() != torch.empty(param.shape, device="meta").stride():
                param.data = param.data.clone(memory_format=torch.contiguous_format)
        self.ds_config = config
        with self._env_changes.watch():
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(config))
        self.module = self.engine
        self._partitioned = any(hasattr(p, "_hp_mapping") for p in model.parameters())
        if self._partitioned:
            self._flat_partitions()   # fail now, not at the first mask change, on an optimizer we cannot reach
        return self.engine, optimizer

    def _flat_partitions(self) -> list[torch.Tensor]:
        return flat_partitions(self.engine.optimizer)

    def attach_masks(self, masks: MaskSet | None) -> None:
        if masks is None or not self._partitioned or isinstance(masks.access, ZeroAccess):
            return
        assert self._optimizer is not None
        masks.set_access(ZeroAccess(self._flat_partitions(), self._optimizer))

    # ---------------------------------------------------------------- step
    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """DeepSpeed counts micro-steps itself; remember the loop's view to check that both agree."""
        self._boundary = sync
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine.is_gradient_accumulation_boundary() != self._boundary:
            raise RuntimeError("the loop and DeepSpeed disagree on the gradient accumulation boundary")
        self.engine.backward(loss, scale_wrt_gas=False)     # the loop already divided by grad_accum_steps
        if not self._boundary:
            self.engine.step()                               # only advances DeepSpeed's micro-step counter

    def step(self, optimizer: torch.optim.Optimizer, before_step: Callable[[], None],
             clip_grad_norm: float | None = None) -> None:
        """Gradients are reduced (into DeepSpeed's buffers under ZeRO); mask them, then DeepSpeed unscales, clips
        (``gradient_clipping`` from the config), steps, zeroes gradients and copies masters back into the module."""
        before_step()
        self.engine.step()

    # --------------------------------------------------------------- state
    @torch.no_grad()
    def model_state_dict(self) -> dict[str, Any]:
        """Module buffers plus full fp32 master weights (collective: every rank calls it)."""
        state = self.model.state_dict()
        if self._partitioned:
            flats = self._flat_partitions()
            names = {id(p): n for n, p in self.model.named_parameters()}
            for group, full in zip(self._groups, gather_groups(self._groups, lambda g: flats[g])):
                for param, tensor in zip(group, full):
                    state[names[id(param)]] = tensor
        return state

    @torch.no_grad()
    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        if self._partitioned:
            flats = self._flat_partitions()
            names = {id(p): n for n, p in self.model.named_parameters()}
            for group in self._groups:
                scatter_group(group, {id(p): state[names[id(p)]] for p in group}, lambda g: flats[g])

    @torch.no_grad()
    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """torch's layout: one entry per parameter, full tensors, so DDP and single-process runs load it."""
        if not self._partitioned:
            return optimizer.state_dict()
        flats = self._flat_partitions()
        states = [optimizer.state.get(flat, {}) for flat in flats]
        out: dict[int, dict[str, Any]] = {}
        groups, index = [], 0
        for g, (group, flat, pg) in enumerate(zip(self._groups, flats, optimizer.param_groups)):
            entries: list[dict[str, Any]] = [{} for _ in group]
            for key, value in states[g].items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    full = gather_groups(self._groups, lambda i, key=key: states[i][key], only=g)[0]
                    for entry, tensor in zip(entries, full):
                        entry[key] = tensor
                else:
                    for entry in entries:
                        entry[key] = value.clone() if torch.is_tensor(value) else value
            for entry in entries:
                if entry:
                    out[index] = entry
                index += 1
            groups.append({**{k: v for k, v in pg.items() if k != "params"},
                           "params": list(range(index - len(group), index))})
        return {"state": out, "param_groups": groups}

    @torch.no_grad()
    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self._partitioned:
            optimizer.load_state_dict(state)
            return
        saved_groups = state["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g) for g in self._groups]:
            raise ValueError("the checkpoint's optimizer has different parameter groups; resume with the same "
                             "model and optim settings")
        flats = self._flat_partitions()
        for group, saved, flat, pg in zip(self._groups, saved_groups, flats, optimizer.param_groups):
            pg.update({k: v for k, v in saved.items() if k != "params"})
            entries = [state["state"].get(i) for i in saved["params"]]
            present = [e for e in entries if e]
            if not present:
                continue
            target = optimizer.state.setdefault(flat, {})
            for key, value in present[0].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if key not in target:
                        target[key] = torch.zeros_like(flat)
                    full = {id(p): (e[key] if e else torch.zeros_like(p, dtype=torch.float32))
                            for p, e in zip(group, entries)}
                    scatter_group(group, full, lambda _g, key=key: target[key])
                elif key in target and torch.is_tensor(target[key]):
                    target[key].copy_(value)
                else:
                    target[key] = value.to(flat.device) if torch.is_tensor(value) else value

    def state_dict(self) -> dict[str, Any]:
        """DeepSpeed's fp16 loss scaler (it replaces torch's GradScaler)."""
        scaler = getattr(self.engine.optimizer, "loss_scaler", None) if self.engine is not None else None
        if scaler is None or self.precision != "fp16":
            return {}
        keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
        return {"loss_scaler": {k: getattr(scaler, k) for k in keys if hasattr(scaler, k)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        for key, value in (state.get("loss_scaler") or {}).items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, value)

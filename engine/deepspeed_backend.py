"""DeepSpeed backend: ZeRO stages 0-2, bf16 / fp16, DeepSpeed's own accumulation, clipping and loss scaling.

Under ZeRO 1 and 2 the weights live twice: whole in the module (fp32, bf16 or fp16, on every rank) and as fp32 master
partitions in the optimizer, each rank owning a slice; after every step the master slices are copied back into the
module. A mask must therefore act on the master copy, or the next step brings pruned weights back. ``ZeroAccess`` is
the MaskSet's way in (see ``pruning.masks.ParamAccess``): it writes the module copy and this rank's master slice,
zeroes this rank's slice of the optimizer state, and masks this rank's slice of the reduced gradients, which DeepSpeed
keeps in its own flat buffers between backward and ``engine.step()``. Everything on the hot path is local: no
gathers, no communication.

Checkpoints hold full tensors in torch's layout (gathered once per checkpoint), so a DeepSpeed checkpoint loads into
the DDP or single-process backend and the other way round, at any world size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from engine.parallel import DDPBackend, DistEnv, ParallelConfig
from pruning.masks import MaskSet, ParamAccess


DEFAULT_BUCKET = 500_000_000   # DeepSpeed's own default bucket size (elements)


def deepspeed_config(cfg: ParallelConfig, precision: str, *, micro_batch_size: int, grad_accum_steps: int,
                     clip_grad_norm: float | None, model_numel: int) -> dict[str, Any]:
    """The DeepSpeed config for our settings, with ``deepspeed_extra`` merged in (one level deep for sections).

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
    for key, value in cfg.deepspeed_extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class _Slice:
    """This rank's part of one parameter: where it sits in the flattened parameter and in the master partition."""

    __slots__ = ("mapping", "lp_start", "hp_start", "numel", "group")

    def __init__(self, mapping: Any) -> None:
        self.mapping = mapping
        self.lp_start = mapping.lp_fragment_address.start
        self.hp_start = mapping.hp_fragment_address.start
        self.numel = mapping.lp_fragment_address.numel
        self.group = mapping.param_group_index

    def of_full(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a parameter-shaped tensor, flattened in logical order."""
        return tensor.reshape(-1).narrow(0, self.lp_start, self.numel)

    def of_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's elements inside a master-partition-shaped tensor (weights or optimizer state)."""
        return flat.narrow(0, self.hp_start, self.numel)


def _local_slice(param: nn.Parameter) -> _Slice | None:
    mapping = getattr(param, "_hp_mapping", None)
    return _Slice(mapping) if mapping is not None else None


def _local_grad(param: nn.Parameter, part: _Slice) -> torch.Tensor:
    """This rank's slice of the reduced gradient, a view into DeepSpeed's buffer (flattened, logical order)."""
    grad = part.mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
    if grad.numel() != part.numel:           # an optimizer that keeps a whole-parameter gradient buffer
        grad = grad.narrow(0, part.lp_start, part.numel)
    return grad


class ZeroAccess(ParamAccess):
    """MaskSet access under ZeRO 1/2: module copy plus this rank's master, optimizer-state and gradient slices."""

    def __init__(self, flat_partitions: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.flat = flat_partitions        # fp32 master partition of each param group, as the optimizer steps it
        self.optimizer = optimizer         # the torch optimizer DeepSpeed steps; its state is keyed by the partitions
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> (mask factor, local slice)

    def fill_(self, name: str, param: nn.Parameter, positions: torch.Tensor,
              values: torch.Tensor | None = None) -> None:
        super().fill_(name, param, positions, values)            # the module copy, whole on every rank
        part = _local_slice(param)
        if part is None:
            return
        master = part.mapping.hp_fragment
        where = part.of_full(positions)
        if values is None:
            master.masked_fill_(where, 0.0)
        else:
            new = part.of_full(values.to(device=master.device, dtype=master.dtype))
            master.copy_(torch.where(where, new, master))

    def zero_optimizer_state_(self, name: str, param: nn.Parameter, positions: torch.Tensor,
                              optimizer: torch.optim.Optimizer) -> None:
        part = _local_slice(param)
        if part is None:
            return
        flat = self.flat[part.group]
        where = part.of_full(positions)
        for value in self.optimizer.state.get(flat, {}).values():
            if torch.is_tensor(value) and value.shape == flat.shape:
                part.of_flat(value).masked_fill_(where, 0)

    def mask_grads_(self, params: Mapping[str, nn.Parameter], factors: Mapping[str, torch.Tensor]) -> None:
        """Mask this rank's reduced gradient slices (DeepSpeed's buffers, read by the coming ``engine.step()``)."""
        grads, multipliers = [], []
        for name, factor in factors.items():
            param = params[name]
            part = _local_slice(param)
            if part is None:
                continue
            grad = _local_grad(param, part)
            grads.append(grad)
            multipliers.append(self._local_factor(name, factor, part, grad.dtype))
        if grads:
            torch._foreach_mul_(grads, multipliers)

    def dense_grads(self, params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Whole reduced gradients (fp32) from every rank's slices, in one all-reduce. Update steps only, never the
        hot path."""
        device = next(iter(params.values())).device if params else torch.device("cpu")
        return dict(zip(params, _assemble(list(params.values()), _local_grad, device)))

    def _local_factor(self, name: str, factor: torch.Tensor, part: _Slice, dtype: torch.dtype) -> torch.Tensor:
        """This rank's slice of the mask factor, cut once per mask change and kept in the gradient's dtype."""
        cached = self._factors.get(name)
        if cached is None or cached[0] is not factor or cached[1].dtype != dtype:
            cached = (factor, part.of_full(factor).to(dtype).contiguous())
            self._factors[name] = cached
        return cached[1]


class DeepSpeedBackend(DDPBackend):
    """deepspeed.initialize owns the step: accumulation boundaries, loss scaling, clipping, the ZeRO partitions."""

    name = "deepspeed"

    def __init__(self, env: DistEnv, device: torch.device, precision: str, cfg: ParallelConfig) -> None:
        super().__init__(env, device, precision, cfg)          # torch's process group: gloo on CPU, NCCL on CUDA
        for key, value in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", env.world_size)):
            os.environ.setdefault(key, str(value))             # DeepSpeed reads them; unset in a one-process run
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.scaler = None                                     # DeepSpeed scales fp16 losses itself
        self.engine: Any = None
        self._groups: list[list[nn.Parameter]] = []
        self._boundary = True
        self._partitioned = False
        self._optimizer: torch.optim.Optimizer | None = None

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
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine
        self._partitioned = any(hasattr(p, "_hp_mapping") for p in model.parameters())
        if self._partitioned:
            self._flat_partitions()   # fail now, not at the first mask change, on an optimizer we cannot reach
        return self.engine, optimizer

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The fp32 master partition of each param group in DeepSpeed's ZeRO (or bf16) optimizer."""
        wrapper = self.engine.optimizer
        for attribute in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            flat = getattr(wrapper, attribute, None)
            if flat is not None:
                return list(flat)
        raise TypeError(f"DeepSpeed optimizer {type(wrapper).__name__} keeps its master weights where masks cannot "
                        "reach them; use parallel.zero_stage 1 or 2 without optimizer offload")

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
            for group, full in zip(self._groups, self._gather(lambda g: flats[g])):
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
                self._scatter(group, {id(p): state[names[id(p)]] for p in group}, lambda g: flats[g])

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
            entries = [dict() for _ in group]
            for key, value in states[g].items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    full = self._gather(lambda i, key=key: states[i][key], only=g)[0]
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
        for g, (group, saved, flat, pg) in enumerate(zip(self._groups, saved_groups, flats, optimizer.param_groups)):
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
                    self._scatter(group, full, lambda _g, key=key: target[key])
                elif key in target and torch.is_tensor(target[key]):
                    target[key].copy_(value)
                else:
                    target[key] = value.to(flat.device) if torch.is_tensor(value) else value

    def state_dict(self) -> dict[str, Any]:
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

    # ------------------------------------------------------------ partitions
    @torch.no_grad()
    def _gather(self, source: Callable[[int], torch.Tensor], only: int | None = None
                ) -> list[list[torch.Tensor]]:
        """Full fp32 tensors, one per parameter of each group, from every rank's slices of a partition-shaped tensor
        (one all-reduce per group: the slices of different ranks are disjoint)."""
        out = []
        for g, group in enumerate(self._groups):
            if only is not None and g != only:
                continue
            flat = source(g)
            full = _assemble(group, lambda _param, part, flat=flat: part.of_flat(flat), flat.device)
            out.append([tensor.cpu().clone() for tensor in full])
        return out

    def _scatter(self, group: list[nn.Parameter], full: Mapping[int, torch.Tensor],
                 target: Callable[[int], torch.Tensor]) -> None:
        """Write this rank's slices of full parameter-shaped tensors into a partition-shaped tensor (no comm)."""
        for param in group:
            part = _local_slice(param)
            if part is not None:
                flat = target(part.group)
                part.of_flat(flat).copy_(part.of_full(full[id(param)].to(device=flat.device, dtype=flat.dtype)))


def _assemble(params: list[nn.Parameter], local: Callable[[nn.Parameter, _Slice], torch.Tensor],
              device: torch.device) -> list[torch.Tensor]:
    """Whole fp32 tensors, one per parameter, from every rank's ``local(param, slice)`` values: one all-reduce of a
    buffer of the parameters' size (the ranks' slices are disjoint, so the sum is their concatenation)."""
    sizes = [p.numel() for p in params]
    buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    for view, param in zip(buffer.split(sizes), params):
        part = _local_slice(param)
        if part is not None:
            part.of_full(view).copy_(local(param, part))
    dist.all_reduce(buffer)
    return [view.reshape(p.shape) for view, p in zip(buffer.split(sizes), params)]

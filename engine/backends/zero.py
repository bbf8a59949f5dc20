"""Reaching weights, gradients and optimizer state inside DeepSpeed's ZeRO 1/2 partitions, without communication.

Under ZeRO 1 and 2 the weights live twice: whole in the module (fp32, bf16 or fp16, on every rank) and as fp32 master
partitions in the optimizer, each rank owning a slice; after every step the master slices are copied back into the
module. A mask must therefore act on the master copy, or the next step brings pruned weights back. ``ZeroAccess`` is
the MaskSet's way in (see ``pruning.masks.ParamAccess``): it writes the module copy and this rank's master slice,
zeroes this rank's slice of the optimizer state, and masks this rank's slice of the reduced gradients, which DeepSpeed
keeps in its own flat buffers between backward and ``engine.step()``. Everything on the hot path is local; only the
checkpoint helpers (``gather_groups``) and dense gradients for mask updates all-reduce.

Nothing here imports DeepSpeed: the partitions are reached through the ``_hp_mapping`` DeepSpeed attaches to each
parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pruning.masks import ParamAccess


class ParamSlice:
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


def local_slice(param: nn.Parameter) -> ParamSlice | None:
    """The slice of ``param`` this rank owns, or None when another rank owns all of it."""
    mapping = getattr(param, "_hp_mapping", None)
    return ParamSlice(mapping) if mapping is not None else None


def local_grad(param: nn.Parameter, part: ParamSlice) -> torch.Tensor:
    """This rank's slice of the reduced gradient, a view into DeepSpeed's buffer (flattened, logical order)."""
    grad = part.mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
    if grad.numel() != part.numel:           # an optimizer that keeps a whole-parameter gradient buffer
        grad = grad.narrow(0, part.lp_start, part.numel)
    return grad


def flat_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """The fp32 master partition of each param group in DeepSpeed's ZeRO (or bf16) optimizer wrapper."""
    for attribute in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flat = getattr(zero_optimizer, attribute, None)
        if flat is not None:
            return list(flat)
    raise TypeError(f"DeepSpeed optimizer {type(zero_optimizer).__name__} keeps its master weights where masks "
                    "cannot reach them; use parallel.zero_stage 1 or 2 without optimizer offload")


def assemble(params: list[nn.Parameter], local: Callable[[nn.Parameter, ParamSlice], torch.Tensor],
             device: torch.device) -> list[torch.Tensor]:
    """Whole fp32 tensors, one per parameter, from every rank's ``local(param, slice)`` values.

    One all-reduce of a buffer the size of the parameters: the ranks' slices are disjoint, so their sum is their
    concatenation.
    """
    sizes = [p.numel() for p in params]
    buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    for view, param in zip(buffer.split(sizes), params):
        part = local_slice(param)
        if part is not None:
            part.of_full(view).copy_(local(param, part))
    dist.all_reduce(buffer)
    return [view.reshape(p.shape) for view, p in zip(buffer.split(sizes), params)]


@torch.no_grad()
def gather_groups(groups: list[list[nn.Parameter]], source: Callable[[int], torch.Tensor],
                  only: int | None = None) -> list[list[torch.Tensor]]:
    """Full fp32 CPU tensors, one per parameter of each group (or of group ``only``), from every rank's slices of the
    partition-shaped tensor ``source(group index)``: one all-reduce per group."""
    out = []
    for g, group in enumerate(groups):
        if only is not None and g != only:
            continue
        flat = source(g)
        full = assemble(group, lambda _param, part, flat=flat: part.of_flat(flat), flat.device)
        out.append([tensor.cpu().clone() for tensor in full])
    return out


@torch.no_grad()
def scatter_group(group: list[nn.Parameter], full: Mapping[int, torch.Tensor],
                  target: Callable[[int], torch.Tensor]) -> None:
    """Write this rank's slices of full parameter-shaped tensors (keyed by ``id(param)``) into the partition-shaped
    tensor ``target(group index)``; no communication."""
    for param in group:
        part = local_slice(param)
        if part is not None:
            flat = target(part.group)
            part.of_flat(flat).copy_(part.of_full(full[id(param)].to(device=flat.device, dtype=flat.dtype)))


class ZeroAccess(ParamAccess):
    """MaskSet access under ZeRO 1/2: module copy plus this rank's master, optimizer-state and gradient slices."""

    def __init__(self, flat_partitions: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.flat = flat_partitions        # fp32 master partition of each param group, as the optimizer steps it
        self.optimizer = optimizer         # the torch optimizer DeepSpeed steps; its state is keyed by the partitions
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> (mask factor, local slice)

    def fill_(self, name: str, param: nn.Parameter, positions: torch.Tensor,
              values: torch.Tensor | None = None) -> None:
        super().fill_(name, param, positions, values)            # the module copy, whole on every rank
        part = local_slice(param)
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
        part = local_slice(param)
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
            part = local_slice(param)
            if part is None:
                continue
            grad = local_grad(param, part)
            grads.append(grad)
            multipliers.append(self._local_factor(name, factor, part, grad.dtype))
        if grads:
            torch._foreach_mul_(grads, multipliers)

    def dense_grads(self, params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Whole reduced gradients (fp32) from every rank's slices, in one all-reduce. Update steps only, never the
        hot path."""
        device = next(iter(params.values())).device if params else torch.device("cpu")
        return dict(zip(params, assemble(list(params.values()), local_grad, device)))

    def _local_factor(self, name: str, factor: torch.Tensor, part: ParamSlice, dtype: torch.dtype) -> torch.Tensor:
        """This rank's slice of the mask factor, cut once per mask change and kept in the gradient's dtype."""
        cached = self._factors.get(name)
        if cached is None or cached[0] is not factor or cached[1].dtype != dtype:
            cached = (factor, part.of_full(factor).to(dtype).contiguous())
            self._factors[name] = cached
        return cached[1]

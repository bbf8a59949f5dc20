"""MaskSet: the binary masks of a model, keyed by parameter name, and the only way masks change.

Every change goes through :meth:`MaskSet.update`, which (1) zeroes newly pruned weights, (2) sets regrown weights to
their value and zeroes their optimizer state, (3) refreshes the multipliers used to mask gradients, and (4) checks
with a cheap checksum that every rank holds the same masks. Gradients of pruned weights are masked before every
optimizer step, so pruned weights stay exactly zero under momentum, Adam and weight decay.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pruning.agreement import verify_agreement


@dataclass(frozen=True)
class LayerStat:
    """Accounting of one prunable tensor: size, weights the mask keeps, weights actually non-zero."""

    name: str
    numel: int
    kept: int
    nonzero: int

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 1.0


@dataclass(frozen=True)
class MaskChange:
    """What one update did to one layer."""

    dropped: int
    grown: int


class MaskSet:
    """Bool masks for named parameters of the unwrapped model (never keyed by ``id()``)."""

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params: dict[str, nn.Parameter] = dict(params)
        self.masks: dict[str, torch.Tensor] = {
            name: torch.ones_like(p, dtype=torch.bool, memory_format=torch.contiguous_format)
            for name, p in self.params.items()
        }
        self._factors: dict[str, torch.Tensor] = {}
        self._refresh_factors()

    # ----------------------------------------------------------------- access
    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.masks.items())

    # ------------------------------------------------------------- changing
    def update(self, new_masks: Mapping[str, torch.Tensor], *, optimizer: torch.optim.Optimizer | None = None,
               grow_values: Mapping[str, torch.Tensor] | None = None, check: bool = True) -> dict[str, MaskChange]:
        """Replace masks of the named layers; prune, regrow and check agreement. Returns churn per layer.

        ``grow_values[name]`` (full-shape tensor) gives the value of regrown weights; the default is zero.
        """
        changes: dict[str, MaskChange] = {}
        with torch.no_grad():
            for name, new in new_masks.items():
                old = self.masks[name]
                new = new.to(device=old.device, dtype=torch.bool).reshape(old.shape)
                param = self.params[name]
                dropped = old & ~new
                grown = new & ~old
                param.masked_fill_(~new, 0.0)
                n_grown = int(grown.sum())
                if n_grown:
                    values = grow_values.get(name) if grow_values is not None else None
                    if values is not None:
                        param.copy_(torch.where(grown, values.to(param.dtype), param))
                    if optimizer is not None:
                        zero_optimizer_state(optimizer, param, grown)
                self.masks[name] = new.contiguous()
                changes[name] = MaskChange(dropped=int(dropped.sum()), grown=n_grown)
        self._refresh_factors(new_masks.keys())
        if check:
            self.verify()
        return changes

    def apply_(self) -> None:
        """Zero every pruned weight (after loading weights or masks from elsewhere)."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.params[name].masked_fill_(~mask, 0.0)

    def mask_grads_(self) -> None:
        """Zero the gradients of pruned weights, in one fused pass over the layers that have any."""
        grads, factors = [], []
        for name, factor in self._factors.items():
            grad = self.params[name].grad
            if grad is not None:
                grads.append(grad)
                factors.append(factor)
        if grads:
            torch._foreach_mul_(grads, factors)

    def verify(self) -> None:
        """Raise if the masks differ across ranks (no-op on a single process)."""
        device = next(iter(self.masks.values())).device if self.masks else None
        verify_agreement(self.masks, device=device)

    def _refresh_factors(self, names: object = None) -> None:
        """Keep a gradient-dtype copy of each mask that prunes anything; fully dense layers need no multiply."""
        for name in (self.masks if names is None else names):
            mask = self.masks[name]
            if bool(mask.all()):
                self._factors.pop(name, None)
            else:
                param = self.params[name]
                self._factors[name] = mask.to(param.dtype).to(memory_format=_memory_format(param))

    # ----------------------------------------------------------- accounting
    def stats(self) -> list[LayerStat]:
        """Per-layer size, kept and non-zero counts."""
        return [LayerStat(name, mask.numel(), int(mask.sum()), int(torch.count_nonzero(self.params[name])))
                for name, mask in self.masks.items()]

    def density(self) -> float:
        """Fraction of prunable weights the masks keep."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / total if total else 1.0

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore masks saved by :meth:`state_dict` and zero the weights they prune."""
        if set(state) != set(self.masks):
            missing = sorted(set(self.masks) - set(state))
            extra = sorted(set(state) - set(self.masks))
            raise ValueError(f"saved masks do not match this model's prunable layers (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}); resume with the same model and sparsity.targets")
        for name, mask in state.items():
            if mask.shape != self.masks[name].shape:
                raise ValueError(f"saved mask for {name} has shape {tuple(mask.shape)}, the model has "
                                 f"{tuple(self.masks[name].shape)}; resume with the same model options")
            self.masks[name] = mask.to(device=self.masks[name].device, dtype=torch.bool).contiguous()
        self._refresh_factors()
        self.apply_()


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def zero_optimizer_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, positions: torch.Tensor) -> None:
    """Zero every per-element optimizer state of ``param`` (momentum, Adam moments) at ``positions``."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(positions, 0)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over every parameter of the model."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def dense_stats(params: Mapping[str, nn.Parameter]) -> list[LayerStat]:
    """Accounting for layers with no mask (a dense baseline)."""
    return [LayerStat(name, p.numel(), p.numel(), int(torch.count_nonzero(p.detach()))) for name, p in params.items()]

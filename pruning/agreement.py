"""Making every rank build the same masks, and proving it.

Random choices come from a generator seeded by (seed, step, parameter name), so ranks agree without communication.
After each mask change the ranks compare a cheap checksum (kept count and a position hash per layer) with two
small all-reduces (MIN and MAX); any difference stops the run with the name of the first layer that differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash; int64 sums wrap identically on every rank


class MaskDisagreementError(RuntimeError):
    """Masks differ between ranks: a method made a rank-local choice."""


def seeded_generator(seed: int, step: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose stream depends only on (seed, step, name): the same on every rank, every run."""
    digest = hashlib.blake2b(f"{seed}:{step}:{name}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


def mask_checksums(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(layers, 2) int64: kept count and a hash of kept positions, per layer in name order."""
    rows = []
    for mask in masks.values():
        kept = mask.reshape(-1).nonzero().reshape(-1)
        rows.append(torch.stack([kept.numel() + torch.zeros((), dtype=torch.int64, device=kept.device),
                                 (kept * _HASH_MULTIPLIER).sum()]))
    if not rows:
        return torch.zeros(0, 2, dtype=torch.int64)
    return torch.stack(rows)


def verify_agreement(masks: Mapping[str, torch.Tensor], device: torch.device | None = None) -> None:
    """Raise MaskDisagreementError naming the first layer whose mask differs across ranks (no-op on one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    sums = mask_checksums(masks)
    if device is not None:
        sums = sums.to(device)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differs = (low != high).any(dim=1).nonzero().reshape(-1)
    if differs.numel():
        index = int(differs[0])
        name = list(masks)[index]
        raise MaskDisagreementError(
            f"masks differ across ranks at layer {name} (kept {int(low[index, 0])}..{int(high[index, 0])} weights, "
            f"{differs.numel()} layer(s) differ): a sparsity method made a rank-local choice; seed its random "
            f"choices with pruning.agreement.seeded_generator or reduce its scores over ranks")

"""Turning scores into masks: exact counts, deterministic ties, budgets spread over layers, seeded random scores.

The primitives every scope (``pruning.scopes``) is built from. Thresholds come from ``torch.kthvalue`` or a partial
``torch.topk`` (``torch.quantile`` refuses tensors over ~16M elements). Ties at the threshold are broken by flat index
(lowest first) so every rank and every run keeps exactly the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pruning.agreement import seeded_generator

Distribution = Literal["uniform", "er", "erk"]


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of ``scores``) keeping exactly the ``k`` highest scores; ties go to the lowest index."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} scores")
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN; the scorer overflowed or divided by zero")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_largest(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat,
                            k).to(flat.dtype)
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        ties = (flat == threshold).nonzero().reshape(-1)[:missing]
        keep[ties] = True
    return keep.reshape(scores.shape)


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor: a partial ``topk`` when k (or n - k) is small, else ``kthvalue``
    (the same value either way; topk is about 3x faster on the CPU for a few grown weights out of 100k)."""
    n = flat.numel()
    if 32 * k <= n:
        return torch.topk(flat, k, sorted=False).values.min()
    if 32 * (n - k + 1) <= n:
        return torch.topk(flat, n - k + 1, largest=False, sorted=False).values.max()
    return torch.kthvalue(flat, n - k + 1).values


def apportion(total: int, shares: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``shares`` (largest remainder), each at most its cap."""
    if total > sum(caps):
        raise ValueError(f"cannot place {total} items in capacity {sum(caps)}")
    counts = [0] * len(shares)
    free = [i for i in range(len(shares)) if caps[i] > 0]
    remaining = total
    while remaining > 0 and free:
        weight = sum(shares[i] for i in free)
        ideal = {i: remaining * (shares[i] / weight if weight > 0 else 1 / len(free)) for i in free}
        grant = {i: min(caps[i] - counts[i], math.floor(ideal[i])) for i in free}
        order = sorted(free, key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
        left = remaining - sum(grant.values())
        for i in order:
            if left <= 0:
                break
            if counts[i] + grant[i] < caps[i]:
                grant[i] += 1
                left -= 1
        for i, g in grant.items():
            counts[i] += g
        remaining = total - sum(counts)
        free = [i for i in free if counts[i] < caps[i]]
    return counts


def layer_densities(shapes: Mapping[str, torch.Size], density: float,
                    distribution: Distribution = "uniform") -> dict[str, float]:
    """Per-layer densities whose weighted mean is ``density``.

    uniform: every layer at ``density``. er / erk (Erdos-Renyi, with kernel terms for erk): density proportional
    to (sum of dims) / (product of dims), rescaled to hit the global target, with layers capped at 1.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if distribution == "uniform":
        return {name: density for name in shapes}
    raw: dict[str, float] = {}
    for name, shape in shapes.items():
        dims = list(shape) if distribution == "erk" else list(shape[:2])
        raw[name] = sum(dims) / math.prod(dims)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse_mass = sum(raw[n] * sizes[n] for n in shapes if n not in dense)
        scale = (budget - sum(sizes[n] for n in dense)) / sparse_mass
        newly = {n for n in shapes if n not in dense and scale * raw[n] > 1.0}
        if not newly:
            break
        dense |= newly
    return {name: 1.0 if name in dense else scale * raw[name] for name in shapes}


def layer_counts(shapes: Mapping[str, torch.Size], density: float, distribution: Distribution) -> dict[str, int]:
    """Weights to keep per layer: the distribution's densities, rounded so the total is round(density * N)."""
    densities = layer_densities(shapes, density, distribution)
    sizes = [math.prod(s) for s in shapes.values()]
    total = round(density * sum(sizes))
    shares = [densities[n] * size for n, size in zip(shapes, sizes)]
    return dict(zip(shapes, apportion(total, shares, sizes)))


def global_top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Masks keeping the ``k`` highest scores across all layers (one threshold), ties broken by position."""
    flat = torch.cat([s.reshape(-1).to(torch.float64 if s.dtype == torch.float64 else torch.float32)
                      for s in scores.values()])
    keep = keep_top_k(flat, k)
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start:start + score.numel()].reshape(score.shape)
        start += score.numel()
    return masks


def keep_top_k_per_row(scores: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """Bool mask of a 2-D ``scores`` keeping the ``counts[i]`` highest of row i; ties go to the lowest index.

    Per-unit pruning (every output row / filter to the same fraction) needs one exact budget per row; a stable
    descending sort gives each entry its rank in its row, so the rule matches :func:`keep_top_k` row by row.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (units x fan-in), got shape {tuple(scores.shape)}")
    rows, n = scores.shape
    budget = torch.as_tensor(counts, device=scores.device).expand(rows)
    if bool((budget < 0).any()) or bool((budget > n).any()):
        raise ValueError(f"cannot keep {budget.tolist()} of {n} scores per row")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; the scorer overflowed or divided by zero")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(rows, n))
    return rank < budget.unsqueeze(1)


def keep_top_units(scores: Mapping[str, torch.Tensor], unit_size: Mapping[str, int],
                   budget: int) -> dict[str, torch.Tensor]:
    """Keep units in order of score (one global ranking; ties by layer order, then index) while the weights they
    hold fit in ``budget``: the kept count is at most the budget and short of it by less than the next unit."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().double().reshape(-1).cpu() for n in names])
    sizes = torch.cat([torch.full((scores[n].numel(),), unit_size[n], dtype=torch.int64) for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices
    fits = torch.cumsum(sizes[order], 0) <= budget
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[fits]] = True
    masks, start = {}, 0
    for name in names:
        count = scores[name].numel()
        masks[name] = keep[start:start + count].to(scores[name].device)
        start += count
    return masks


# ------------------------------------------------------------------------------------------ seeded random masks
def seeded_uniform(param: torch.Tensor, seed: int, step: int, purpose: str) -> torch.Tensor:
    """U(0, 1) values shaped like ``param`` (on its device) from the (seed, step, purpose) stream: rank-independent."""
    return torch.rand(param.shape, generator=seeded_generator(seed, step, purpose)).to(param.device)

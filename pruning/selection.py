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
    if bool(flat.isnan().any()):
        raise ValueError("scores contain NaN; the scorer overflowed or divided by zero")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_largest(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat,
                            k).to(flat.dtype)
    keep = flat > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        ties = (flat == threshold).nonzero().reshape(-1)[:missing]
        keep[ties] = True
    return keep.reshape(scores.shape)


def prune_at_or_below(scores: torch.Tensor, k: int, below: int = 0) -> torch.Tensor:
    """The Synaptic Flow code's rule: prune every score at or below the ``k``-th smallest, keep the rest.

    ``below`` extra entries of value 0 (pruned weights, which score 0 in the reference) take part in the ranking
    without being in ``scores``. Where scores tie at the threshold every tied entry goes, so more than ``k`` may be
    pruned (the reference's GraSP loses 2.7M zero scores at compression 10^0.25); k < 1 prunes nothing, as there.
    """
    flat = scores.reshape(-1)
    if k < 1 or flat.numel() == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if bool(flat.isnan().any()):
        raise ValueError("scores contain NaN; the scorer overflowed or divided by zero")
    if below == 0:
        threshold = kth_smallest(flat, min(k, flat.numel()))
    else:   # the sorted union is [negatives] [zeros: pruned ones and scored ones] [positives]
        negatives = int(torch.count_nonzero(flat < 0))
        zeros = int(torch.count_nonzero(flat == 0))
        if k <= negatives:
            threshold = kth_smallest(flat, k)
        elif k <= negatives + zeros + below:
            threshold = flat.new_zeros(())
        else:
            threshold = kth_smallest(flat, min(k - below, flat.numel()))
    return (flat > threshold).reshape(scores.shape)


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor (the same value ``torch.kthvalue`` gives)."""
    return kth_smallest(flat, flat.numel() - k + 1)


SAMPLE = 1 << 14   # values sampled to bracket the k-th smallest


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor, exactly ``torch.kthvalue(flat, k).values``.

    Written here because ``kthvalue`` over millions of scores is the slowest part of iterative pruning at init
    (0.28 s for 14.7M float32 on the project's 2-core VM; SynFlow does it 100 times). A random sample of 16,384
    values (a fixed seed: a strided one aliases with the kernel structure of conv scores), sorted, brackets the answer between two sample values with a margin of 4 standard deviations of the
    sample quantile; one counting pass checks that the k-th smallest really lies in the band, and ``kthvalue`` runs
    on the band only (about 6% of the values). If the bracket misses (it cannot be wrong, only useless: skewed data,
    many ties), the whole tensor goes to ``kthvalue``. Same value either way, so every rule built on it is exact.
    """
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} is outside 1..{n}")
    if n <= 8 * SAMPLE:
        return torch.kthvalue(flat, k).values
    picks = torch.randint(n, (SAMPLE,), generator=torch.Generator().manual_seed(n + k)).to(flat.device)
    sample = flat[picks].sort().values
    size = sample.numel()
    margin = 4.0 * math.sqrt(size) + 8.0
    position = k / n * size
    low, high = math.floor(position - margin), math.ceil(position + margin)
    bounded_below, bounded_above = low > 0, high < size - 1     # else that side of the bracket is open
    if not (bounded_below or bounded_above):
        return torch.kthvalue(flat, k).values
    lo, hi = sample[max(low, 0)], sample[min(high, size - 1)]
    if bounded_below and bool(sample[low - 1] == lo):
        # the lower bracket sits in a block of ties (pruned -inf or 0 scores): count the block, answer from it when
        # it holds the k-th value, and keep it out of the band otherwise
        fewer, at_lo = int(torch.count_nonzero(flat < lo)), int(torch.count_nonzero(flat == lo))
        if fewer < k <= fewer + at_lo:
            return lo
        fewer += at_lo
        inside = (flat > lo) & (flat <= hi) if bounded_above else flat > lo
    else:
        fewer = int(torch.count_nonzero(flat < lo)) if bounded_below else 0
        inside = ((flat >= lo) & (flat <= hi)) if bounded_below and bounded_above else (
            flat >= lo if bounded_below else flat <= hi)
    band = flat[inside]
    if fewer < k <= fewer + band.numel():
        return torch.kthvalue(band, k - fewer).values
    return torch.kthvalue(flat, k).values


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


def global_top_k(scores: Mapping[str, torch.Tensor], k: int,
                 alive: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks keeping the ``k`` highest scores across all layers (one threshold), ties broken by position.

    ``alive`` (bool, shaped like each score): only those entries compete, the rest are dropped (see
    :func:`_competing` for how).
    """
    flat, sizes, compact = _competing(scores, alive, -math.inf)
    keep = keep_top_k(flat, k)
    return _scatter(keep, sizes, scores, alive, compact)


def global_prune_at_or_below(scores: Mapping[str, torch.Tensor], density: float,
                             alive: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The reference's global rule (:func:`prune_at_or_below`) at ``density``: k = floor((1 - density) * N) over
    every weight, pruned ones counted as 0 scores, and nothing that was pruned comes back."""
    total = sum(s.numel() for s in scores.values())
    flat, sizes, compact = _competing(scores, alive, 0.0)
    dead = total - sum(sizes) if compact else 0
    keep = prune_at_or_below(flat, int((1.0 - density) * total), below=dead)
    return _scatter(keep, sizes, scores, alive, compact)


def _competing(scores: Mapping[str, torch.Tensor], alive: Mapping[str, torch.Tensor] | None,
               dead_value: float) -> tuple[torch.Tensor, list[int], bool]:
    """The flat scores that compete (all layers in one vector), each layer's length in it, and whether the alive
    entries were gathered (compact) or the dead ones overwritten in place.

    Once fewer than a quarter of the entries are alive (late iterations of pruning at init), the alive scores are
    gathered so the ranking works on what is left; before that, writing every score with the dead ones replaced by
    ``dead_value`` straight into the flat vector is cheaper (one pass, no gather and scatter)."""
    flats = [_as_float(s).reshape(-1) for s in scores.values()]
    if alive is None:
        return torch.cat(flats), [f.numel() for f in flats], False
    masks = [alive[name].reshape(-1) for name in scores]
    count = sum(int(torch.count_nonzero(m)) for m in masks)
    if 4 * count < sum(f.numel() for f in flats):
        parts = [torch.masked_select(f, m) for f, m in zip(flats, masks)]
        return torch.cat(parts), [p.numel() for p in parts], True
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in flats) else torch.float32
    out = torch.empty(sum(f.numel() for f in flats), dtype=dtype, device=flats[0].device)
    start = 0
    for f, m in zip(flats, masks):
        torch.where(m, f.to(dtype), torch.tensor(dead_value, dtype=dtype, device=f.device),
                    out=out[start:start + f.numel()])
        start += f.numel()
    return out, [f.numel() for f in flats], False


def _as_float(score: torch.Tensor) -> torch.Tensor:
    return score if score.dtype in (torch.float32, torch.float64) else score.float()


def _scatter(keep: torch.Tensor, sizes: Sequence[int], scores: Mapping[str, torch.Tensor],
             alive: Mapping[str, torch.Tensor] | None, compact: bool) -> dict[str, torch.Tensor]:
    """Split a flat keep vector back into per-layer masks; never keeps an entry that is not alive."""
    masks, start = {}, 0
    for (name, score), size in zip(scores.items(), sizes):
        part = keep[start:start + size]
        start += size
        if alive is None:
            masks[name] = part.reshape(score.shape)
        elif compact:
            live = alive[name].reshape(score.shape)
            masks[name] = torch.zeros_like(live).masked_scatter_(live, part)
        else:
            masks[name] = part.reshape(score.shape) & alive[name].reshape(score.shape)
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

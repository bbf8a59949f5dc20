"""Pruning-at-initialisation scores: SNIP, GraSP, SynFlow, and the pieces they share.

Pure functions of a model, its prunable parameters and (for the data-dependent scores) a list of batches. Gradients
are taken with ``torch.autograd.grad`` on the prunable weights only, so scoring never leaves anything in ``.grad``
and never fires the gradient hooks of a DDP wrapper around the model. On several ranks the sums over batches are
all-reduced, so every rank computes the same scores from different data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

Batch = tuple[torch.Tensor, torch.Tensor]

GRASP_EPS = 1e-10


# ----------------------------------------------------------------------------------------------------- helpers
def distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over ranks in one flat all-reduce (identity on one process)."""
    if not distributed() or not tensors:
        return dict(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    dist.all_reduce(flat)
    out, start = {}, 0
    for name, t in tensors.items():
        out[name] = flat[start:start + t.numel()].view_as(t)
        start += t.numel()
    return out


def rank_share(total: int, rank: int, world_size: int) -> int:
    """This rank's part of ``total`` items dealt over ranks (parts differ by at most one, they sum to total)."""
    return total // world_size + (1 if rank < total % world_size else 0)


@contextlib.contextmanager
def scoring_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Score in eval mode (or train mode when asked) and leave the model as it was.

    In train mode, batch norm would update its running statistics from the scoring batches; they are restored so
    that scoring changes nothing but the masks.
    """
    was_training = model.training
    saved = {name: b.clone() for name, b in model.named_buffers()} if train else {}
    model.train(train)
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])


def output_width(model: nn.Module, sample: torch.Tensor) -> int:
    """Number of model outputs (classes) for one sample, found with one eval-mode forward."""
    with scoring_mode(model, train=False), torch.no_grad():
        return int(model(sample[:1]).shape[-1])


def balanced_batches(batches: Iterable[Batch], model: nn.Module, per_class: int, rank: int = 0,
                     world_size: int = 1, device: torch.device | None = None,
                     batch_size: int | None = None) -> list[Batch]:
    """Up to ``per_class`` samples of every class, dealt over ranks, regrouped into batches of ``batch_size``
    (default: the loader's), in the order they were drawn; the last batch may be short.

    Each rank takes its share of the per-class quota from its own batches, so the ranks together score
    ``per_class`` samples per class, as one process would. The pass over the loader stops once every class is full.
    """
    quota = rank_share(per_class, rank, world_size)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    counts: torch.Tensor | None = None
    batch_size_seen = 1
    if quota == 0:
        return []
    for inputs, targets in batches:
        batch_size_seen = max(batch_size_seen, len(targets))
        if counts is None:
            counts = torch.zeros(output_width(model, inputs.to(device) if device else inputs), dtype=torch.int64)
        for x, y in zip(inputs, targets):
            label = int(y)
            if 0 <= label < len(counts) and counts[label] < quota:
                counts[label] += 1
                xs.append(x)
                ys.append(y)
        if bool((counts >= quota).all()):
            break
    if not xs:
        return []
    x_all, y_all = torch.stack(xs), torch.stack(ys)
    if device is not None:
        x_all, y_all = x_all.to(device), y_all.to(device)
    batch_size = batch_size or batch_size_seen
    return [(x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(y_all), batch_size)]


def sample_count(batches: Sequence[Batch], device: torch.device) -> int:
    """Samples scored over all ranks (each rank holds its own batches)."""
    count = torch.tensor([float(sum(len(y) for _, y in batches))], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(count)
    return int(count.item())


def _loss(model: nn.Module, batch: Batch, temperature: float, reduction: str) -> torch.Tensor:
    """Cross-entropy of f(x) / T over the batch, summed or averaged."""
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs) / temperature, targets, reduction=reduction)


BATCH_WEIGHTINGS = ("batch_mean", "sample")
"""How scoring batches are combined. batch_mean (the Synaptic Flow code): the sum over batches of the gradient of
each batch's mean loss, so every batch counts the same and a short last batch as much as a full one. sample: the
gradient of the mean loss over all samples, every sample counting the same (independent of how they are batched)."""


def mean_loss_gradient(model: nn.Module, params: Mapping[str, nn.Parameter], batches: Sequence[Batch],
                       temperature: float = 1.0, weighting: str = "batch_mean") -> dict[str, torch.Tensor]:
    """Gradient of the scoring loss over every batch of every rank, combined by ``weighting``
    (:data:`BATCH_WEIGHTINGS`); summed over batches, then over ranks."""
    names, tensors = list(params), list(params.values())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    reduction = _reduction(weighting)
    for batch in batches:
        grads = torch.autograd.grad(_loss(model, batch, temperature, reduction), tensors)
        for name, grad in zip(names, grads):
            total[name] += grad
    total = all_reduce_sum(total)
    n = sample_count(batches, tensors[0].device)
    if n == 0:
        raise ValueError("no scoring samples on any rank: the data set gave no batches")
    if weighting == "batch_mean":
        return total
    return {name: g / n for name, g in total.items()}


def _reduction(weighting: str) -> str:
    if weighting not in BATCH_WEIGHTINGS:
        raise ValueError(f"batch_weighting must be one of {', '.join(BATCH_WEIGHTINGS)}, got {weighting!r}")
    return "mean" if weighting == "batch_mean" else "sum"


def snip_scores(params: Mapping[str, nn.Parameter], grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|theta * dL/dtheta|, normalised by the sum over every prunable weight."""
    scores = {name: (p.detach() * grads[name]).abs() for name, p in params.items()}
    norm = sum(float(s.sum(dtype=torch.float64)) for s in scores.values())
    return {name: s / norm for name, s in scores.items()} if norm > 0 else scores


# -------------------------------------------------------------------------------------------------------- GraSP
def hessian_gradient_product(model: nn.Module, params: Mapping[str, nn.Parameter], batches: Sequence[Batch],
                             g: Mapping[str, torch.Tensor], temperature: float,
                             weighting: str = "batch_mean") -> dict[str, torch.Tensor]:
    """H g for the scoring loss: per batch, differentiate (g . grad L) again (create_graph), sum, all-reduce;
    batches combined by ``weighting`` as in :func:`mean_loss_gradient`."""
    names, tensors = list(params), list(params.values())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    reduction = _reduction(weighting)
    for batch in batches:
        grads = torch.autograd.grad(_loss(model, batch, temperature, reduction), tensors, create_graph=True)
        dot = sum((grad * g[name]).sum() for name, grad in zip(names, grads))
        hg = torch.autograd.grad(dot, tensors)
        for name, value in zip(names, hg):
            total[name] += value
    total = all_reduce_sum(total)
    if weighting == "batch_mean":
        return total
    n = sample_count(batches, tensors[0].device)
    return {name: value / n for name, value in total.items()}


def grasp_scores(params: Mapping[str, nn.Parameter], hg: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta * Hg / (|sum| + 1e-10): keeping the highest removes the paper's largest -theta * Hg."""
    scores = {name: p.detach() * hg[name] for name, p in params.items()}
    norm = abs(sum(float(s.sum(dtype=torch.float64)) for s in scores.values())) + GRASP_EPS
    return {name: s / norm for name, s in scores.items()}


# ------------------------------------------------------------------------------------------------------ SynFlow
def synflow_state(model: nn.Module, params: Mapping[str, nn.Parameter],
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Absolute-valued copies (in ``dtype``) of every parameter and buffer of ``model`` except ``params``: the part of
    SynFlow's linearised model that pruning does not change, built once and reused over the iterations."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in params:
            value = tensor.detach().abs()
            state[name] = value.to(dtype) if value.is_floating_point() else value
    return state


def synflow_scores(model: nn.Module, params: Mapping[str, nn.Parameter], input_shape: Sequence[int],
                   dtype: torch.dtype = torch.float32, fixed: Mapping[str, torch.Tensor] | None = None,
                   weights: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(|theta * dR/dtheta| per prunable weight, R), for R = sum of f(1) with every state entry replaced by |.|.

    The model is evaluated functionally on absolute-valued copies of its parameters and buffers (norm affine
    parameters and running statistics included), so the model's own tensors, signs and statistics are never
    touched: "restoring the signs" is exact by construction. ``fixed``: :func:`synflow_state` of the model when the
    caller keeps it over iterations (only the prunable weights change between them); ``weights``: |theta| of the
    prunable weights in ``dtype`` when the caller keeps them too (they become the leaves). ``dtype`` float64 avoids the
    float32 under- and overflow of R at extreme compression.
    """
    state = dict(synflow_state(model, params, dtype) if fixed is None else fixed)
    if weights is None:
        weights = {name: p.detach().abs().to(dtype) for name, p in params.items()}
    leaves = {name: weights[name].detach().requires_grad_(True) for name in params}
    state.update(leaves)
    device = next(iter(params.values())).device
    ones = torch.ones((1, *input_shape), dtype=dtype, device=device)
    R = functional_call(model, state, (ones,)).sum()
    grads = torch.autograd.grad(R, list(leaves.values()), allow_unused=True)
    scores = {}
    for (name, leaf), grad in zip(leaves.items(), grads):
        # the gradient is a fresh tensor: |grad| * theta in place (theta >= 0 here) is |theta * grad|
        scores[name] = torch.zeros_like(leaf.detach()) if grad is None else grad.abs_().mul_(leaf.detach())
    return scores, R.detach()


def float32_trouble(scores: Mapping[str, torch.Tensor], R: torch.Tensor, keep: int | None = None) -> str | None:
    """Why a float32 SynFlow pass cannot be trusted (None when it can).

    R over- or underflowed (inf, NaN, zero, or below the smallest normal float32), or some score is not finite.
    Scores are >= 0. With ``keep`` (the weights this iteration keeps): fewer than ``keep`` scores are normal floats,
    so the threshold falls among subnormal or zero scores that lost their precision (subnormal scores below a normal
    threshold are pruned whatever their exact value, so they do no harm). Without it: any score is subnormal.
    """
    tiny = torch.finfo(torch.float32).tiny
    r = float(R)
    if not math.isfinite(r):
        return f"R = {r} overflowed"
    if r < tiny:
        return f"R = {r:.3g} underflowed"
    for name, s in scores.items():
        if not math.isfinite(float(s.amax())):      # NaN and inf both show in the maximum
            return f"scores of {name} overflowed"
    if keep is not None:
        normal = sum(int(torch.count_nonzero(s >= tiny)) for s in scores.values())
        return f"only {normal} scores are normal floats, {keep} are kept: scores underflowed" if normal < keep \
            else None
    for name, s in scores.items():
        if int(torch.count_nonzero(s < tiny)) > int(torch.count_nonzero(s == 0)):
            return f"scores of {name} underflowed"
    return None


# ------------------------------------------------------------------------------------------ structured pruning
def input_sizes(model: nn.Module, params: Mapping[str, nn.Parameter], sample: torch.Tensor) -> dict[str, int]:
    """H_in * W_in of the input of the layer owning each prunable weight (tokens for a linear on sequences).

    Recorded with forward hooks during one eval-mode forward of one sample.
    """
    owners = {name.rsplit(".", 1)[0] if "." in name else "": name for name in params}
    sizes: dict[str, int] = {}
    handles = []
    for module_name, module in model.named_modules():
        if module_name in owners:
            def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                     key: str = owners[module_name]) -> None:
                shape = inputs[0].shape
                spatial = shape[2:] if isinstance(mod, nn.modules.conv._ConvNd) else shape[1:-1]
                sizes[key] = math.prod(spatial)
            handles.append(module.register_forward_hook(hook))
    try:
        with scoring_mode(model, train=False), torch.no_grad():
            model(sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in params if name not in sizes]
    if missing:
        raise ValueError(f"layer of {missing[0]} did not run in the forward pass; its compute is unknown")
    return sizes


def unit_compute(params: Mapping[str, nn.Parameter], sizes: Mapping[str, int]) -> dict[str, float]:
    """Compute per output unit, 2 * H_in * W_in * C_in * k^2, normalised by the largest layer's (ranks unchanged)."""
    raw = {name: 2.0 * sizes[name] * math.prod(p.shape[1:]) for name, p in params.items()}
    top = max(raw.values())
    return {name: value / top for name, value in raw.items()}

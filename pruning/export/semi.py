"""2:4 semi-structured export: linear layers whose weights keep at most 2 of every 4 consecutive inputs, run by
torch's semi-structured sparse kernels (``torch.sparse.to_sparse_semi_structured``: cuSPARSELt or CUTLASS on the
sparse tensor cores of Ampere and newer GPUs) in float16 or bfloat16.

The groups are those of the N:M scope (``pruning.scopes.NMScope``): 4 consecutive entries of a row of the (out, in)
weight, the K dimension of the product ``x W^T``. A model pruned with ``sparsity.nm: [2, 4]`` meets the pattern; any
linear with at most 2 non-zeros in every group does. Other layers (convolutions, linears off the pattern or off the
kernels' shape constraints) run dense in the same precision; the plan says which and why.

Everything but the kernel call works on any device, so it is tested on a CPU: the plan (which layers, why not), the
file form (per layer, the 2 kept values of every group in the export's precision and their two 2-bit positions,
packed two groups to a byte: 1.125 bytes per weight at 16 bits against 4 dense fp32) and its exact inverse. Only
:func:`to_semi_structured` needs CUDA, and :func:`require_cuda` says so in one line first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}   # relative output error (norm) against the fp32 masked model
GROUP, KEPT = 4, 2


def require_cuda(device: torch.device | str) -> None:
    """One-line ValueError unless ``device`` is a CUDA device that exists."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ValueError("--format 2:4 needs a CUDA GPU: torch's semi-structured sparse kernels "
                         "(to_sparse_semi_structured) run only on CUDA sparse tensor cores; this machine "
                         + ("has none" if not torch.cuda.is_available() else f"was asked for {device}")
                         + "; export on a GPU machine with --device cuda, or use --format csr here")


def follows_two_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights of each row keeps at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % GROUP:
        return False
    return bool(((weight != 0).reshape(-1, GROUP).sum(1) <= KEPT).all())


def shape_limits(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, columns) a weight's shape must be a multiple of for torch's default 2:4 backend in ``dtype``."""
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    backend = (SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
               else SparseSemiStructuredTensorCUSPARSELT)
    limits = backend._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return limits.sparse_min_rows, limits.sparse_min_cols


@dataclass
class SemiChoice:
    """One layer's verdict: ``2:4`` or ``dense``, and why not when dense."""

    name: str
    shape: tuple[int, ...]
    kept: str
    reason: str = ""

    def line(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.name:<32} {str(list(self.shape)):<14} -> {self.kept}{reason}"


def plan(model: nn.Module, dtype: torch.dtype) -> list[SemiChoice]:
    """Which linear layers of ``model`` become 2:4 in ``dtype``, and why the others stay dense."""
    rows, cols = shape_limits(dtype)
    choices = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
            shape = tuple(weight.shape)
            if not follows_two_four(weight):
                choices.append(SemiChoice(name, shape, "dense", "not 2:4: a group of 4 inputs keeps more than 2"))
            elif shape[1] % cols:
                choices.append(SemiChoice(name, shape, "dense", f"the kernel needs inputs in multiples of {cols}"))
            else:
                pad = -shape[0] % rows
                choices.append(SemiChoice(name, shape, "2:4", f"outputs padded to {shape[0] + pad}" if pad else ""))
        elif isinstance(module, nn.modules.conv._ConvNd):
            choices.append(SemiChoice(name, tuple(module.weight.shape), "dense",
                                      "a convolution: the 2:4 kernels are 2-D matrix products"))
    return choices


def pack(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2:4 weight as ``values`` (out, in / 2: the two kept entries of every group, in order) and ``positions``
    (one byte per two groups, flat: each group's two positions in 0..3, 2 bits each, the first group in the low
    4 bits)."""
    if not follows_two_four(weight):
        raise ValueError(f"a weight of shape {tuple(weight.shape)} is not 2:4")
    out = weight.shape[0]
    groups = weight.reshape(-1, GROUP)
    # the 2 kept slots of every group: its non-zeros first, in order, then its lowest zero slots
    order = torch.argsort((groups == 0).to(torch.int8), dim=1, stable=True)[:, :KEPT].sort(dim=1).values
    values = torch.gather(groups, 1, order).reshape(out, -1)
    codes = (order[:, 0] | (order[:, 1] << 2)).to(torch.uint8)          # 4 bits per group
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.reshape(-1, 2)
    return {"values": values.contiguous(), "positions": (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()}


def unpack(values: torch.Tensor, positions: torch.Tensor, shape: list[int] | tuple[int, int]) -> torch.Tensor:
    """The dense (out, in) weight of :func:`pack`'s tensors (zeros elsewhere); exact inverse."""
    out, fan_in = shape
    count = out * fan_in // GROUP
    if values.numel() != count * KEPT or positions.numel() != (count + 1) // 2:
        raise ValueError(f"2:4 tensors of {values.numel()} values and {positions.numel()} position bytes do not "
                         f"make a ({out}, {fan_in}) weight")
    flat = positions.reshape(-1).to(torch.int64)
    codes = torch.stack([flat & 0xF, flat >> 4], dim=1).reshape(-1)[:count]
    order = torch.stack([codes & 0x3, codes >> 2], dim=1)
    if bool((order[:, 0] >= order[:, 1]).any()):
        raise ValueError("2:4 positions are corrupt: a group's two positions must be distinct and increasing")
    groups = torch.zeros(count, GROUP, dtype=values.dtype, device=values.device)
    groups.scatter_(1, order.to(values.device), values.reshape(count, KEPT))
    return groups.reshape(out, fan_in)


def to_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    """The CUDA half-precision 2:4 weight as torch's semi-structured sparse tensor (the one call that needs a GPU)."""
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight.contiguous())


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` whose weight is a semi-structured sparse tensor; inference only. Unconverted (``convert``
    false) it holds the dense half-precision 2:4 weight, so the same layer runs and is checked on a CPU.

    The kernels take weights of a multiple of 16 or 32 rows: others (a 1000-class head) get zero rows added and
    the extra outputs are sliced off."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, convert: bool = True) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        pad = -weight.shape[0] % shape_limits(weight.dtype)[0]
        if pad:
            weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
            bias = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(pad)])
        self.register_buffer("weight", to_semi_structured(weight) if convert else weight, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.contiguous(), self.weight, self.bias)    # the kernel views the input as 2-D
        return y[..., :self.out_features] if y.shape[-1] != self.out_features else y


class CastInput(nn.Module):
    """Runs ``model`` in ``dtype``: the input is cast to it and the output back to float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def semi_tensors(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                                  list[SemiChoice]]:
    """(the tensors to save, the 2:4 layers' specs, the plan) of a masked fp32 ``model``: 2:4 layers packed, every
    other tensor as the model holds it in ``dtype`` (floating ones) or as it is."""
    choices = plan(model, dtype)
    chosen = {c.name for c in choices if c.kept == "2:4"}
    tensors = {key: (value.to(dtype) if value.is_floating_point() else value)
               for key, value in model.state_dict().items()
               if key.rpartition(".")[0] not in chosen or key.rpartition(".")[2] != "weight"}
    layers = {}
    for name in chosen:
        weight = model.get_submodule(name).weight.detach().to(dtype)
        for key, value in pack(weight).items():
            tensors[f"{name}.{key}"] = value
        layers[name] = {"shape": list(weight.shape)}
    return tensors, layers, choices


def load_semi(model: nn.Module, tensors: dict[str, torch.Tensor], layers: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str, convert: bool = True) -> nn.Module:
    """Put saved 2:4 tensors into a freshly built fp32 ``model``: the model in ``dtype`` on ``device``, its 2:4 layers
    semi-structured (``convert``; needs CUDA) or dense half-precision (``convert=False``: checking on a CPU)."""
    if convert:
        require_cuda(device)
    rest = dict(tensors)
    model = model.to(device=device, dtype=dtype)
    for name, spec in layers.items():
        values, positions = rest.pop(f"{name}.values"), rest.pop(f"{name}.positions")
        weight = unpack(values.to(device), positions.to(device), spec["shape"]).to(dtype)
        layer = model.get_submodule(name)
        bias = rest.pop(f"{name}.bias").to(device=device, dtype=dtype) if layer.bias is not None else None
        _set(model, name, SemiStructuredLinear(weight, bias, convert))
    model.load_state_dict(rest, strict=True)
    return CastInput(model, dtype).eval()


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| in float32."""
    reference, output = reference.float(), output.float()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-30))


@torch.no_grad()
def export_semi(model: nn.Module, example: torch.Tensor, precision: str, device: torch.device | str,
                convert: bool = True, report: Any = print
                ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """(the exported model, its tensors, its manifest part) of a masked fp32 ``model`` in ``precision`` (bf16 /
    fp16): the plan is reported per layer, the exported model's output on ``example`` must be within the precision's
    tolerance of ``model``'s (:data:`TOLERANCE`), else ValueError. ``convert`` false: the 2:4 layers stay dense half
    weights (the same numbers without the kernel), so everything but the conversion runs on a CPU."""
    if precision not in DTYPES:
        raise ValueError(f"--precision must be one of {', '.join(DTYPES)} for --format 2:4, got {precision!r}")
    if convert:
        require_cuda(device)
    dtype = DTYPES[precision]
    model = model.to(device).eval()
    tensors, layers, choices = semi_tensors(model, dtype)
    for choice in choices:
        report(choice.line())
    if not layers:
        raise ValueError("--format 2:4 found no linear layer keeping at most 2 of every 4 inputs in a shape the kernel "
                         "takes; prune with sparsity.nm=[2,4] (see the plan above)")
    reference = model(example.to(device))
    exported = load_semi(copy.deepcopy(model), tensors, layers, dtype, device, convert)
    error = relative_error(reference, exported(example.to(device)))
    if not error <= TOLERANCE[precision]:
        raise ValueError(f"the 2:4 export's output is off the masked model's by {error:.2e} (relative), over the "
                         f"{precision} tolerance {TOLERANCE[precision]:g}")
    return exported, tensors, {"layers": layers, "precision": precision, "rel_error": error,
                               "converted": sum(1 for c in choices if c.kept == "2:4"), "planned": len(choices)}

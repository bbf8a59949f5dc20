"""Compressed-sparse-row layers run by torch's sparse kernels, chosen per layer by timing on the target device.

A linear layer ``y = x W^T + b`` becomes ``y^T = addmm(b, W_csr, x^T)``: torch multiplies a CSR matrix by a dense one
in time proportional to the non-zeros (MKL on the CPU, cuSPARSE on CUDA). A convolution becomes the same product on
its unfolded input (im2col): ``W_csr`` (out, in * kh * kw) times the (in * kh * kw, batch * positions) patches. The
unfold copies the input kh * kw times, so it only pays where the weights are sparse enough; whether it does is
measured, never assumed: at export every candidate layer is timed dense and sparse (``torch.utils.benchmark``) on its
own input from an example batch, and stays dense unless sparse is faster.

Indices are int32 where they fit, so a kept weight costs 8 bytes (value and column) instead of 4 bytes for every
weight, pruned or not: the weights shrink once density is under one half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import warnings

import torch
from torch import nn
from torch.nn import functional as F

Choice = Literal["auto", "sparse", "dense"]


def _to_csr(weight: torch.Tensor) -> torch.Tensor:
    """(rows, cols) CSR of a 2-D weight, int32 indices where they fit."""
    with warnings.catch_warnings():          # torch's "sparse CSR support is in beta" notice, once per layer
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.detach().to_sparse_csr()
    if csr.values().numel() < 2**31 and max(weight.shape) < 2**31:
        csr = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(),
                                      weight.shape, check_invariants=False)    # torch's own output: valid
    return csr


def _csr_from(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A CSR tensor from stored components, with torch's invariant checks on (the file is data, not trusted code)."""
    return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=True)


class _CsrBase(nn.Module):
    """The CSR weight (a non-persistent buffer: saved as its three components) and the dense bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        """W_csr @ rows (+ bias per output row): (out, n)."""
        if self.bias is None:
            return torch.sparse.mm(self.weight, rows)
        return torch.addmm(self.bias.unsqueeze(1), self.weight, rows)

    def components(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors that store the weight: ``<prefix>.crow_indices``, ``.col_indices``, ``.values``."""
        weight = self.weight
        return {f"{prefix}.crow_indices": weight.crow_indices(), f"{prefix}.col_indices": weight.col_indices(),
                f"{prefix}.values": weight.values()}

    def nnz(self) -> int:
        return int(self.weight.values().numel())


class CsrLinear(_CsrBase):
    """``nn.Linear`` with a CSR weight; inference only (no parameters)."""

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> CsrLinear:
        return cls(_to_csr(layer.weight), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return self._product(rows.t().contiguous()).t().reshape(*x.shape[:-1], self.weight.shape[0])

    def spec(self) -> dict[str, Any]:
        return {"kind": "linear", "shape": list(self.weight.shape)}


class CsrConv2d(_CsrBase):
    """``nn.Conv2d`` (groups 1, zero padding) as a CSR weight times the unfolded input; inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> None:
        super().__init__(weight, bias)
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        return (isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"
                and not isinstance(layer.padding, str))

    @classmethod
    def from_conv(cls, layer: nn.Conv2d) -> CsrConv2d:
        weight = layer.weight.detach().reshape(layer.out_channels, -1)
        return cls(_to_csr(weight), layer.bias, layer.kernel_size, layer.stride, layer.padding, layer.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        out_h, out_w = (
            (size + 2 * pad - dil * (k - 1) - 1) // step + 1
            for size, pad, dil, k, step in zip((height, width), self.padding, self.dilation, self.kernel_size,
                                               self.stride))
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)   # (B, C*kh*kw, L)
        rows = patches.transpose(0, 1).reshape(patches.shape[1], -1)                       # (C*kh*kw, B*L)
        out = self._product(rows).view(-1, batch, out_h * out_w).transpose(0, 1)
        return out.reshape(batch, -1, out_h, out_w)

    def spec(self) -> dict[str, Any]:
        return {"kind": "conv2d", "shape": list(self.weight.shape), "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation)}


@dataclass
class LayerChoice:
    """One candidate layer's verdict: its density, dense and sparse median microseconds, and the form kept."""

    name: str
    kind: str
    density: float
    dense_us: float | None
    sparse_us: float | None
    kept: str

    def line(self) -> str:
        timing = ("not timed" if self.dense_us is None or self.sparse_us is None else
                  f"dense {self.dense_us:9.1f} us  csr {self.sparse_us:9.1f} us  "
                  f"({self.dense_us / self.sparse_us:5.2f}x)")
        return f"{self.name:<32} {self.kind:<7} density {self.density:6.4f}  {timing}  -> {self.kept}"


def _median_us(module: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    from torch.utils import benchmark   # imported here: it loads torch's C++ extension tools and warns without CUDA

    timer = benchmark.Timer(stmt="module(x)", globals={"module": module, "x": x},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or CsrConv2d.supports(m)) and bool((m.weight == 0).any())}


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def sparsify(model: nn.Module, example: torch.Tensor, choice: Choice = "auto",
             min_run_time: float = 0.2) -> list[LayerChoice]:
    """Turn ``model``'s linear and conv layers that hold zeros into CSR layers, in place, where ``choice`` says.

    ``auto``: each layer is timed on its input from ``example`` (on ``example``'s device) and kept dense unless CSR is
    faster; ``sparse`` / ``dense``: every candidate becomes CSR / stays dense, untimed. Layers without a zero weight
    are not candidates. Returns one ``LayerChoice`` per candidate, in module order.
    """
    if choice not in ("auto", "sparse", "dense"):
        raise ValueError(f"choice must be auto, sparse or dense, got {choice!r}")
    model.eval()
    candidates = _candidates(model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0]))
             for name, m in candidates.items()]
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    verdicts = []
    for name, layer in candidates.items():
        sparse = CsrLinear.from_linear(layer) if isinstance(layer, nn.Linear) else CsrConv2d.from_conv(layer)
        density = sparse.nnz() / layer.weight.numel()
        dense_us = sparse_us = None
        keep_sparse = choice == "sparse"
        if choice == "auto" and name in inputs:       # a layer the forward never reached stays as it is
            dense_us = _median_us(layer, inputs[name], min_run_time)
            sparse_us = _median_us(sparse, inputs[name], min_run_time)
            keep_sparse = sparse_us < dense_us
        if keep_sparse:
            _set(model, name, sparse)
        verdicts.append(LayerChoice(name, sparse.spec()["kind"], density, dense_us, sparse_us,
                                    "csr" if keep_sparse else "dense"))
    return verdicts


def csr_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(every tensor to save, the CSR layers' specs) of a model after :func:`sparsify`."""
    tensors = dict(model.state_dict())
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, _CsrBase):
            tensors.update(module.components(name))
            layers[name] = module.spec()
    return tensors, layers


def load_csr(model: nn.Module, tensors: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Put saved CSR layers (``layers``: name -> spec) and the other tensors into a freshly built ``model``."""
    rest = dict(tensors)
    for name, spec in layers.items():
        parts = [rest.pop(f"{name}.{key}") for key in ("crow_indices", "col_indices", "values")]
        weight = _csr_from(*parts, spec["shape"])
        bias = tensors.get(f"{name}.bias")
        if spec["kind"] == "linear":
            module: nn.Module = CsrLinear(weight, bias)
        else:
            module = CsrConv2d(weight, bias, spec["kernel_size"], spec["stride"], spec["padding"], spec["dilation"])
        _set(model, name, module)
    model.load_state_dict(rest, strict=True)
    return model.eval()

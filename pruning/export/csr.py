"""Compressed-sparse-row layers, chosen per layer by timing on the target device.

A linear layer ``y = x W^T + b`` becomes ``y^T = W_csr x^T + b``, in time proportional to the non-zeros. Two kernels
multiply: the project's own (``csr_kernel.c`` through :mod:`pruning.export.native`: CPU, float32; see that file for
why it exists) and torch's (``torch.addmm`` on the CSR tensor: MKL on the CPU, cuSPARSE on CUDA). A convolution becomes
the same product on its unfolded input (im2col): ``W_csr`` (out, in * kh * kw) times the (in * kh * kw, batch *
positions) patches; the unfold copies the input kh * kw times, so that form rarely pays. The project's kernel also
has a direct sparse convolution (each kept weight adds a shifted input plane to an output plane; no unfold). Which
form pays is measured, never assumed: at export every candidate layer is timed dense and in each sparse form
(``torch.utils.benchmark``) on its own input from an example batch, and stays dense unless sparse is faster.

Torch's kernel may also run a linear *tiled*: the rows of its input in tiles of ``tile`` (128, 256, 512), each
transposed and multiplied alone. It streams the whole (in, rows) operand once per non-zero row of W; when that
operand outgrows the cache (a ViT's 2,080 tokens x 1,536 inputs is 12.8 MB) every pass goes to memory, while a
tile's slice stays in cache. (The project's kernel tiles the batch itself.)

Indices are int32 where they fit, so a kept weight costs 8 bytes (value and column) instead of 4 bytes for every
weight, pruned or not: the weights shrink once density is under one half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

import pruning.export.native as native

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
    with warnings.catch_warnings():          # torch's "sparse CSR support is in beta" notice, once per layer
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=True)


class _CsrBase(nn.Module):
    """The CSR weight (a non-persistent buffer: saved as its three components), the dense bias, and the kernel that
    multiplies: torch's, or the hand-written one (``native``: its (V, U), see ``csr_kernel.c``), which runs where it
    is built and the operand is a float32 CPU tensor, torch's kernel otherwise."""

    DIRECT: tuple[str, ...] = ()   # "direct" where the layer has a native form that is not a product (convs)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 native_variant: tuple[int, int] | str | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.native: tuple[int, int] | str | None = (
            native_variant if native_variant is None or isinstance(native_variant, str) else tuple(native_variant))
        if self.native is not None and self.native not in (*native.VARIANTS, *self.DIRECT):
            raise ValueError(f"no native CSR variant {self.native!r} for {type(self).__name__}; there are "
                             f"{[list(v) for v in native.VARIANTS] + list(self.DIRECT)}")
        self._variant = native.VARIANTS.index(self.native) if isinstance(self.native, tuple) else None

    def _native_spec(self) -> list[int] | str | None:
        """``native`` as the manifest stores it (JSON: a list for a (V, U) variant)."""
        return list(self.native) if isinstance(self.native, tuple) else self.native

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """x W_csr^T (+ bias): (n, out) for the layer's input rows ``x`` (n, in). The native kernel reads ``x`` with
        any strides and writes the rows contiguous; torch's kernel multiplies W by x^T made contiguous (free when
        ``x`` is a transposed view) and its result is handed back as a transposed view of (out, n)."""
        if self._variant is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            prepared = self._native_weight()
            if prepared is not None:
                return prepared.product(x, self._variant)
        rows = x.t().contiguous()
        if self.bias is None:
            return torch.sparse.mm(self.weight, rows).t()
        return torch.addmm(self.bias.unsqueeze(1), self.weight, rows).t()

    def _native_weight(self) -> native.NativeWeight | None:
        """The weight set up for the native kernel (redone when ``.to()`` replaced it); None where it does not fit."""
        cached = self.__dict__.get("_prepared")
        if cached is None or cached[0] is not self.weight or cached[1] is not self.bias:
            fits = native.NativeWeight.fits(self.weight, self.bias)
            cached = (self.weight, self.bias, native.NativeWeight(self.weight, self.bias) if fits else None)
            self.__dict__["_prepared"] = cached
        return cached[2]

    def components(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors that store the weight: ``<prefix>.crow_indices``, ``.col_indices``, ``.values``."""
        weight = self.weight
        return {f"{prefix}.crow_indices": weight.crow_indices(), f"{prefix}.col_indices": weight.col_indices(),
                f"{prefix}.values": weight.values()}

    def nnz(self) -> int:
        return int(self.weight.values().numel())

    def form(self) -> str:
        """How the layer runs: ``torch``, ``torch tile N``, ``native VxU`` or ``native direct``."""
        if isinstance(self.native, str):
            return f"native {self.native}"
        if self.native is not None:
            return f"native {self.native[0]}x{self.native[1]}"
        return f"torch tile {self.tile}" if getattr(self, "tile", None) else "torch"


class CsrLinear(_CsrBase):
    """``nn.Linear`` with a CSR weight; inference only (no parameters). ``tile``: input rows per product of torch's
    kernel (None: all at once; see the module); ``native``: see :class:`_CsrBase`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tile: int | None = None,
                 native_variant: tuple[int, int] | str | None = None) -> None:
        super().__init__(weight, bias, native_variant)
        if tile is not None and tile < 1:
            raise ValueError(f"a CSR tile must be at least 1 row, got {tile}")
        self.tile = tile

    @classmethod
    def from_linear(cls, layer: nn.Linear, tile: int | None = None) -> CsrLinear:
        return cls(_to_csr(layer.weight), layer.bias, tile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])   # 2-D: no reshapes (call overhead shows on LeNet)
        if self.native is None and self.tile is not None and rows.shape[0] > self.tile:
            out = rows.new_empty(rows.shape[0], self.weight.shape[0])
            for start in range(0, rows.shape[0], self.tile):
                out[start:start + self.tile] = self._product(rows[start:start + self.tile])
        else:
            out = self._product(rows)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.weight.shape[0])

    def with_native(self, variant: tuple[int, int]) -> CsrLinear:
        """This layer (same weight) run by the native kernel's ``variant``."""
        return CsrLinear(self.weight, self.bias, None, variant)

    def spec(self) -> dict[str, Any]:
        return {"kind": "linear", "shape": list(self.weight.shape), "tile": self.tile,
                "native": self._native_spec()}


class CsrConv2d(_CsrBase):
    """``nn.Conv2d`` (groups 1, zero padding) as a CSR weight times the unfolded input; inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                 native_variant: tuple[int, int] | str | None = None) -> None:
        super().__init__(weight, bias, native_variant)
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

    DIRECT = ("direct",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native == "direct" and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4:
            prepared = self._native_weight()
            if prepared is not None:
                return prepared.conv2d(x, self.kernel_size, self.stride, self.padding, self.dilation)
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        out_h, out_w = (
            (size + 2 * pad - dil * (k - 1) - 1) // step + 1
            for size, pad, dil, k, step in zip((height, width), self.padding, self.dilation, self.kernel_size,
                                               self.stride))
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)   # (B, C*kh*kw, L)
        rows = patches.transpose(0, 1).reshape(patches.shape[1], -1)                       # (C*kh*kw, B*L)
        out = self._product(rows.t()).view(batch, out_h * out_w, -1).transpose(1, 2)
        return out.reshape(batch, -1, out_h, out_w)

    def with_native(self, variant: tuple[int, int] | str) -> CsrConv2d:
        """This layer (same weight) run by the native kernel's ``variant``, or its direct convolution ("direct")."""
        return CsrConv2d(self.weight, self.bias, self.kernel_size, self.stride, self.padding, self.dilation, variant)

    def spec(self) -> dict[str, Any]:
        return {"kind": "conv2d", "shape": list(self.weight.shape), "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "native": self._native_spec()}


@dataclass
class LayerChoice:
    """One candidate layer's verdict: its density, dense and (best) sparse median microseconds, the form kept, and
    how that sparse form multiplies (``CsrLinear.form``: torch's kernel, in tiles, or the native kernel)."""

    name: str
    kind: str
    density: float
    dense_us: float | None
    sparse_us: float | None
    kept: str
    form: str = ""

    def line(self) -> str:
        timing = ("not timed" if self.dense_us is None or self.sparse_us is None else
                  f"dense {self.dense_us:9.1f} us  csr {self.sparse_us:9.1f} us  "
                  f"({self.dense_us / self.sparse_us:5.2f}x)")
        kept = f"{self.kept} ({self.form})" if self.kept == "csr" and self.form else self.kept
        return f"{self.name:<32} {self.kind:<7} density {self.density:6.4f}  {timing}  -> {kept}"


TILES = (128, 256, 512)   # input rows per product tried for a linear at export (where its input has more rows)


def _median_us(module: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    """Median microseconds of ``module(x)``; with one torch thread on the CPU, of that thread's CPU time, so waiting
    for a core on a shared machine does not count."""
    from torch.utils import benchmark   # imported here: it loads torch's C++ extension tools and warns without CUDA

    threads = torch.get_num_threads()
    clock = {"timer": time.thread_time} if x.device.type == "cpu" and threads == 1 else {}
    timer = benchmark.Timer(stmt="module(x)", globals={"module": module, "x": x}, num_threads=threads, **clock)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def _variants(sparse: _CsrBase, x: torch.Tensor) -> list[_CsrBase]:
    """The forms of one CSR layer worth timing on input ``x``: torch's kernel, then every variant of the native
    kernel where it is built and takes ``x`` (it tiles the batch itself), else torch's kernel on row tiles of a
    linear's input (each of :data:`TILES` smaller than its rows)."""
    forms: list[_CsrBase] = [sparse]
    if x.dtype == torch.float32 and x.device.type == "cpu" and sparse._native_weight() is not None:
        forms += [sparse.with_native(variant) for variant in (*native.VARIANTS, *sparse.DIRECT)]
    elif isinstance(sparse, CsrLinear):
        rows = x.numel() // x.shape[-1]
        forms += [CsrLinear(sparse.weight, sparse.bias, tile) for tile in TILES if tile < rows]
    return forms


def _fastest(sparse: _CsrBase, x: torch.Tensor, min_run_time: float) -> tuple[_CsrBase, float]:
    """The fastest form of ``sparse`` on ``x`` (:func:`_variants`) and its median microseconds."""
    timed = [(_median_us(form, x, min_run_time), index, form) for index, form in enumerate(_variants(sparse, x))]
    us, _, form = min(timed)
    return form, us


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

    ``auto``: layer by layer in the order the forward reaches them, each is timed on its input from ``example`` (on
    ``example``'s device) *as the model converted so far hands it over* (a CSR layer's output is a transposed view,
    cheap for a next CSR layer and dear for a dense one), and kept dense unless CSR is faster, each CSR form of
    :func:`_variants` timed and the fastest kept; ``sparse`` / ``dense``: every candidate becomes CSR (the native
    kernel's default variant where it runs, else torch's, untiled) / stays dense, untimed. Layers without a zero
    weight are not candidates; one the forward never reaches stays as it is. Returns one ``LayerChoice`` per
    candidate, in module order.
    """
    if choice not in ("auto", "sparse", "dense"):
        raise ValueError(f"choice must be auto, sparse or dense, got {choice!r}")
    model.eval()
    candidates = _candidates(model)
    reached = list(_inputs(model, example, candidates)) if choice == "auto" else list(candidates)
    verdicts = {}
    for name in reached + [name for name in candidates if name not in reached]:
        layer = candidates[name]
        sparse = CsrLinear.from_linear(layer) if isinstance(layer, nn.Linear) else CsrConv2d.from_conv(layer)
        density = sparse.nnz() / layer.weight.numel()
        dense_us = sparse_us = None
        keep_sparse = choice == "sparse"
        if keep_sparse and example.device.type == "cpu" and sparse._native_weight() is not None:
            sparse = sparse.with_native(native.DEFAULT)      # untimed: the native kernel's all-round variant
        if choice == "auto" and name in reached:
            x = _inputs(model, example, {name: layer})[name]
            dense_us = _median_us(layer, x, min_run_time)
            sparse, sparse_us = _fastest(sparse, x, min_run_time)
            keep_sparse = sparse_us < dense_us
        if keep_sparse:
            _set(model, name, sparse)
        verdicts[name] = LayerChoice(name, sparse.spec()["kind"], density, dense_us, sparse_us,
                                     "csr" if keep_sparse else "dense", sparse.form())
    return [verdicts[name] for name in candidates]


class _Reached(Exception):
    """Raised by the input hook once every asked-for layer has its input: the rest of the forward is not needed."""


def _inputs(model: nn.Module, example: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The first input each of ``layers`` receives in a forward of ``example``, in the order the forward reaches
    them (layers it never reaches are absent); the forward stops once all are seen."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str, args: tuple[Any, ...]) -> None:
        seen.setdefault(name, args[0])
        if len(seen) == len(layers):
            raise _Reached

    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args))
               for name, m in layers.items()]
    try:
        model(example)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


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
        variant = spec.get("native")
        if spec["kind"] == "linear":
            module: nn.Module = CsrLinear(weight, bias, spec.get("tile"), variant)
        else:
            module = CsrConv2d(weight, bias, spec["kernel_size"], spec["stride"], spec["padding"], spec["dilation"],
                               variant)
        _set(model, name, module)
    if any(spec.get("native") for spec in layers.values()) and native.kernel() is None:
        warnings.warn(f"the native CSR kernel is unavailable here ({native.unavailable_reason()}): the layers "
                      f"exported for it run on torch's sparse kernel", stacklevel=2)
    model.load_state_dict(rest, strict=True)
    return model.eval()

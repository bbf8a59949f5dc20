"""The project's CSR kernels (``csr_kernel.c``: a sparse linear product and a direct sparse convolution): built on
first use with the machine's C compiler, cached, and called through ctypes.

Why ctypes and a plain C file rather than a torch C++ extension: the file includes nothing from torch, so it builds
in about a second with any C compiler (a torch extension takes most of a minute to compile its headers), and the
shared library it makes links only libgomp, which torch already loads. Built with ``-march=native``: the cache key
holds the compiler, the flags and this CPU's feature flags, so a home directory shared by different machines never
hands one a library built for another.

Nothing here is required: without a C compiler (or on a failed build) :func:`kernel` returns None, says why in
:func:`unavailable_reason`, and the CSR layers run on torch's sparse kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csr_kernel.c")
# (V, U) of each variant, by the number the C code knows it by: V 8-float vectors per tile row, U sets of sums.
VARIANTS = ((1, 4), (2, 2), (2, 4), (4, 2))
DEFAULT = (2, 2)   # the variant used untimed (``--csr-layers all``): never far from the best on LeNet's layers
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])

_state: dict[str, object] = {}


def cache_dir() -> Path:
    """``$SPARSETRAIN_CACHE/native``, else ``$XDG_CACHE_HOME/sparsetrain/native``, else ``~/.cache/...``."""
    root = os.environ.get("SPARSETRAIN_CACHE")
    if root:
        return Path(root) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsetrain" / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str) -> tuple[Path | None, str]:
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
        target = cache_dir() / f"csr_kernel-{key}.so"
        if target.exists():
            return target, ""
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(SOURCE)],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)     # atomic: a concurrent build of the same key writes the same bytes
                return target, ""
            last = (result.stderr.strip().splitlines() or ["failed"])[-1]
            errors.append(f"{' '.join(flags)}: {last}")
    return None, "; ".join(errors)


class _Csr(ctypes.Structure):
    """``sparsetrain_csr`` of csr_kernel.c."""

    _fields_ = [("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("crow", ctypes.c_void_p),
                ("col", ctypes.c_void_p), ("val", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot be built or loaded."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    lib, reason = None, ""
    if os.environ.get("SPARSETRAIN_NATIVE", "1") == "0":
        reason = "SPARSETRAIN_NATIVE=0"
    elif (compiler := _compiler()) is None:
        reason = "no C compiler (cc, gcc or clang, or $CC) on this machine"
    else:
        try:
            path, reason = _build(compiler)
            if path is not None:
                lib = ctypes.CDLL(str(path))
                function = lib.sparsetrain_csr_linear
                function.restype = ctypes.c_int
                function.argtypes = [ctypes.POINTER(_Csr), ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                conv = lib.sparsetrain_csr_conv2d
                conv.restype = ctypes.c_int
                conv.argtypes = ([ctypes.POINTER(_Csr)] + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
                                 + [ctypes.c_int64] * 10 + [ctypes.c_void_p, ctypes.c_int])
                if lib.sparsetrain_csr_variants() != len(VARIANTS):
                    lib, reason = None, "csr_kernel.c and native.py disagree on the variants"
        except OSError as err:
            lib, reason = None, f"could not build or load the CSR kernel: {err}"
    _state["lib"], _state["reason"] = lib, reason
    return lib


def unavailable_reason() -> str:
    """Why :func:`kernel` is None ('' when it is not, or not tried yet)."""
    return str(_state.get("reason", ""))


class NativeWeight:
    """A CSR weight and bias set up for the kernel once (their pointers in the C struct), so that a call costs one
    ctypes call: at batch 1 the per-call overhead is most of a small layer's time."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.parts = (weight.crow_indices(), weight.col_indices(), weight.values(),
                      None if bias is None else bias.contiguous())     # kept alive: the struct points into them
        crow, col, values, bias = self.parts
        self.struct = _Csr(weight.shape[0], weight.shape[1], crow.data_ptr(), col.data_ptr(), values.data_ptr(),
                           None if bias is None else bias.data_ptr())
        self.pointer = ctypes.pointer(self.struct)
        self.function = kernel().sparsetrain_csr_linear   # type: ignore[union-attr]
        self.conv = kernel().sparsetrain_csr_conv2d       # type: ignore[union-attr]

    @staticmethod
    def fits(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether the kernel is built and takes this weight: CPU, float32, int32 indices (bias likewise)."""
        return (weight.device.type == "cpu" and weight.dtype == torch.float32
                and weight.crow_indices().dtype == torch.int32
                and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
                and kernel() is not None)

    def product(self, x: torch.Tensor, variant: int) -> torch.Tensor:
        """``x @ weight.T + bias``, (n, rows) contiguous, for a float32 CPU ``x`` (n, cols) of any strides."""
        out = torch.empty(x.shape[0], self.struct.rows)
        if self.function(self.pointer, x.shape[0], x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(),
                         variant, torch.get_num_threads()) != 0:
            raise MemoryError("the native CSR kernel could not allocate its tile buffer")
        return out

    def conv2d(self, x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
        """The direct sparse convolution of a float32 CPU ``x`` (batch, channels, height, width) with this weight
        (rows, channels * kh * kw): (batch, rows, out_h, out_w), contiguous."""
        x = x.contiguous()
        batch, channels, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = torch.empty(batch, self.struct.rows, out_h, out_w)
        if self.conv(self.pointer, batch, channels, height, width, x.data_ptr(), kh, kw, sh, sw, ph, pw, dh, dw,
                     out_h, out_w, out.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError("the native CSR kernel could not allocate its padded planes")
        return out

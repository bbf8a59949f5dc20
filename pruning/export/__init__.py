"""Exported forms of a trained sparse model: smaller on disk, and (where the kernels allow) faster to run.

Every format is a plain safetensors file of tensors (never a pickle) plus a small JSON manifest that says what to
build and how to put the tensors into it. Models are built by the caller (pruning never imports models or engine):
the loaders here take a freshly built model and turn it into the exported one.

- ``dense``: the masked weights as the model's own state dict (pruned weights zero), tied weights materialised.
- ``compact``: empty units (all-zero rows and filters) physically removed with every dependent layer shrunk
  (Torch-Pruning's dependency graph); the result is a smaller dense model.
- ``csr``: linear layers, and convolutions through unfold, as compressed-sparse-row weights run by torch's sparse
  kernels, each kept dense unless sparse measured faster on the target device at export.
- ``hashed``: a HashedNet model as its banks plus the assignment of every weight to a bank entry, in the narrowest
  integer type that holds it.
- ``2:4``: linear layers that keep at most 2 of every 4 inputs as torch's semi-structured sparse tensors in
  float16 / bfloat16 (CUDA only), the rest of the model dense in the same precision.
"""

from pruning.export.compact import GroupReport, compact, shrink
from pruning.export.csr import CsrConv2d, CsrLinear, LayerChoice, csr_tensors, load_csr, sparsify
from pruning.export.files import FORMATS, plain_model, read_export, tensor_bytes, write_export
from pruning.export.hashed import hashed_tensors, load_hashed
from pruning.export.semi import export_semi, load_semi, require_cuda

__all__ = ["FORMATS", "CsrConv2d", "CsrLinear", "GroupReport", "LayerChoice", "compact", "csr_tensors",
           "export_semi", "hashed_tensors", "load_csr", "load_hashed", "load_semi", "plain_model", "read_export",
           "require_cuda", "shrink", "sparsify", "tensor_bytes", "write_export"]

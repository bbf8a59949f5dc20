"""The on-disk form shared by every export format: ``model.safetensors`` (tensors only) and ``export.json``.

safetensors stores raw tensor bytes and a JSON header, so loading one runs no code; the manifest is plain JSON.
Both go through fsspec, so an export can be written to any URL a run directory can live at.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.nn.utils import parametrize

FORMATS = ("dense", "compact", "csr", "hashed", "2:4")
TENSORS = "model.safetensors"
MANIFEST = "export.json"


def plain_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parametrization (HashedNet's tied weights) replaced by its current value."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            # the copy shares torch's injected Parametrized<Layer> class with the original, and removing a
            # parametrization deletes its property from that class: give the copy a class of its own first
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (what the weights occupy in memory or in the file, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_export(url: str, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, int]:
    """Write ``<url>/model.safetensors`` and ``<url>/export.json``; returns each file's size in bytes."""
    # safetensors refuses tensors that share storage: give every entry its own contiguous copy
    data = save_safetensors({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})
    text = json.dumps(manifest, indent=2, sort_keys=True)
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{TENSORS}", "wb") as handle:
        handle.write(data)
    with fs.open(f"{root.rstrip('/')}/{MANIFEST}", "w") as handle:
        handle.write(text)
    return {TENSORS: len(data), MANIFEST: len(text.encode())}


def read_export(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, manifest) of an export directory; FileNotFoundError naming what is missing."""
    fs, root = fsspec.core.url_to_fs(url)
    names = {name: f"{root.rstrip('/')}/{name}" for name in (TENSORS, MANIFEST)}
    missing = [name for name, path in names.items() if not fs.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{url} is not an export directory: {' and '.join(missing)} missing; "
                                "pass the --out directory of `python -m launcher export`")
    manifest = json.loads(fs.cat_file(names[MANIFEST]).decode())
    if manifest.get("format") not in FORMATS:
        raise ValueError(f"{url}/{MANIFEST} names format {manifest.get('format')!r}; known: {', '.join(FORMATS)}")
    return load_safetensors(fs.cat_file(names[TENSORS])), manifest

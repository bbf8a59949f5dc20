"""A HashedNet model as what it really is: one bank of K values per layer and the bank entry of every weight.

The dense form stores N floats per layer; this one stores K floats and N indices in the narrowest integer type that
holds K - 1 (uint8 up to 256 entries, int16 up to 32768, else int32), so a layer takes 4K + N bytes instead of 4N
once K <= 256, 4K + 2N up to 32768. Loading gathers every weight once (``bank[assignment]``) into a plain model that
runs at dense speed: the saving is in the file and the transfer, not in the running model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruning.methods.hashed import tied_layers


def _index_dtype(entries: int) -> torch.dtype:
    if entries <= 2**8:
        return torch.uint8
    return torch.int16 if entries <= 2**15 else torch.int32


def hashed_tensors(model: nn.Module, plain: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(tensors, layer specs) of a HashedNet ``model``: banks and narrow assignments of its tied weights, and
    ``plain``'s (the same model, weights materialised) other tensors. ValueError if nothing is tied."""
    ties = tied_layers(model)
    if not ties:
        raise ValueError("--format hashed needs a HashedNet run (sparsity.method: hashednet): this model has no tied "
                         "weights; use --format dense or csr")
    tensors = {k: v for k, v in plain.state_dict().items() if k not in ties}
    layers = {}
    for name, (tie, bank) in ties.items():
        entries = bank.numel()
        tensors[f"{name}.bank"] = bank.detach().reshape(-1)
        tensors[f"{name}.assignment"] = tie.assignment.to(_index_dtype(entries))
        layers[name] = {"shape": list(tie.shape), "bank": entries}
    return tensors, layers


def load_hashed(model: nn.Module, tensors: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Fill a freshly built plain ``model`` from saved banks and assignments (each weight gathered once)."""
    state = dict(tensors)
    for name, spec in layers.items():
        bank, assignment = state.pop(f"{name}.bank"), state.pop(f"{name}.assignment").long()
        if bank.numel() != spec["bank"] or assignment.numel() != torch.Size(spec["shape"]).numel():
            raise ValueError(f"{name}: bank of {bank.numel()} and assignment of {assignment.numel()} do not match the "
                             f"manifest ({spec['bank']} entries, shape {spec['shape']})")
        if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= bank.numel()):
            raise ValueError(f"{name}: assignment points outside its bank of {bank.numel()} entries")
        state[name] = bank[assignment].view(spec["shape"])
    model.load_state_dict(state, strict=True)
    return model.eval()

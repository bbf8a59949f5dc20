"""HashedNet (ALGORITHMS.md section 3): each layer's weights are tied to a small trainable bank.

A layer of N weights keeps a bank of K values (K = round(density * N) in total over the layers, split by
``distribution``) and a fixed assignment of every weight position to a bank entry. ``prepare_model`` turns each target
weight into a ``torch.nn.utils.parametrize`` parametrization, so the bank is the trainable parameter and the weight a
view computed from it: the forward pass is a gather, ``weight = bank[assignment]``, and the backward a scatter-add, so
a bank entry's gradient is the sum of the gradients of the weights tied to it. Optimizer, DDP and checkpoints see only
the banks; nothing is masked, so the method has no MaskSet.

Choices, and where they differ from the reference code:
- The assignment is balanced rather than a hash: position p goes to entry perm[p] % K for a seeded random permutation
  perm of the N positions, so every entry is used floor(N/K) or ceil(N/K) times and none is left unused (a hash leaves
  some entries with no weight and others with many).
- The bank starts from the layer's own initial weights at the K positions with perm[p] < K (a random subset), so the
  initialisation's distribution is kept and those weights keep their initial value.
- The optional gradient rescale divides each entry's summed gradient by its repeat count **before** the optimizer step,
  so momentum, Adam moments, clipping and weight decay see the rescaled gradient. The reference divides after the
  step: a bug, not reproduced.
- Randomness comes from ``seeded_generator(seed, 0, "hashednet/assignment/<layer>")``: every rank builds the same
  model with no communication. The assignment is a non-persistent buffer rebuilt from the seed; the method's state
  keeps a checksum of all assignments, and a resume with other ones is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from pruning.agreement import seeded_generator
from pruning.masks import LayerStat
from pruning.methods.base import MethodConfig, MethodContext, RunFacts, SparsityMethod, register_method
from pruning.selection import layer_counts
from pruning.targets import prunable_parameters

_MIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)  # splitmix64 constants, as signed int64
_CHUNK = 1 << 22


@dataclass
class HashedNetConfig(MethodConfig):
    """density: bank size as a fraction of each layer's weights (the free parameters); distribution: per-layer bank
    sizes (uniform, ER, ERK; exact round(density * N) in total); grad_rescale: divide each bank entry's gradient by
    the number of weights tied to it, before the optimizer step."""

    density: float = 0.1
    distribution: Literal["uniform", "er", "erk"] = "uniform"
    grad_rescale: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density must be in (0, 1) (the fraction of free weights per layer), got {self.density}")
        if self.distribution not in ("uniform", "er", "erk"):
            raise ValueError(f"distribution must be uniform, er or erk, got {self.distribution!r}")

    def check_run(self, run: RunFacts) -> None:
        if self.grad_rescale and run.backend == "deepspeed" and run.zero_stage >= 1:
            raise ValueError(f"sparsity.grad_rescale divides param.grad before the step, but DeepSpeed ZeRO stage "
                             f"{run.zero_stage} keeps reduced gradients in its own partition buffers; set "
                             "sparsity.grad_rescale=false, parallel.zero_stage=0 or parallel.backend=ddp")


class TiedWeight(nn.Module):
    """Parametrization of one weight: ``weight = bank[assignment]``, the bank a (K, 1) column.

    The column shape makes the optimizer's weight-vs-bias rule (``dim() > 1``) treat the bank as the weight it
    replaces. ``right_inverse`` (used when a weight is assigned to the module) is the least-squares projection onto
    tied weights: each entry becomes the mean of the weights tied to it.
    """

    def __init__(self, assignment: torch.Tensor, counts: torch.Tensor, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("assignment", assignment, persistent=False)   # N bank indices, rebuilt from the seed
        self.register_buffer("counts", counts, persistent=False)           # (K, 1) repeats per entry, float
        self.shape = tuple(shape)

    def forward(self, bank: torch.Tensor) -> torch.Tensor:
        return bank.reshape(-1).index_select(0, self.assignment).view(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(self.counts.numel(), dtype=weight.dtype, device=weight.device)
        sums.index_add_(0, self.assignment, weight.reshape(-1))
        return sums.view(-1, 1) / self.counts.to(weight.dtype)


def balanced_assignment(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment, sources): position p -> perm[p] % k, and for each entry j the position with perm[p] == j."""
    perm = torch.randperm(n, generator=generator)
    sources = torch.empty(k, dtype=torch.int64)
    hit = perm < k
    sources[perm[hit]] = hit.nonzero().reshape(-1)
    index_dtype = torch.int32 if n < 2**31 else torch.int64      # half the memory of int64 for every real layer
    return (perm % k).to(index_dtype), sources


def repeat_counts(n: int, k: int) -> torch.Tensor:
    """Weights tied to each entry under :func:`balanced_assignment`: ceil(n/k) for the first n % k, floor after."""
    return torch.full((k,), n // k, dtype=torch.int64) + (torch.arange(k) < n % k)


def assignment_digest(assignment: torch.Tensor) -> int:
    """An order-sensitive 64-bit digest of an assignment, computed where it lives (int64 arithmetic wraps alike)."""
    flat = assignment.reshape(-1)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK].long()
        position = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=flat.device)
        x = (chunk + 1) * _MIX[0] + position * _MIX[1]
        x = x ^ ((x >> 31) & (2**33 - 1))                               # a logical shift on signed int64
        total += (x * _MIX[2]).sum()
    return int(total)


def tied_layers(model: nn.Module) -> dict[str, tuple[TiedWeight, nn.Parameter]]:
    """(parametrization, bank) of every tied weight of ``model``, keyed by the weight's name (``layers.0.weight``)."""
    found: dict[str, tuple[TiedWeight, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            chain = module.parametrizations["weight"]
            if isinstance(chain[0], TiedWeight):
                found[f"{module_name}.weight" if module_name else "weight"] = (chain[0], chain.original)
    return found


@register_method("hashednet")
class HashedNet(SparsityMethod):
    """Tied weights: each target layer is a gather from its own bank of K trainable values (see the module doc)."""

    Config = HashedNetConfig
    config: HashedNetConfig

    @classmethod
    def prepare_model(cls, config: MethodConfig, model: nn.Module, context: MethodContext) -> nn.Module:
        """Replace every target weight by a gather from a bank (before the optimizer is built: it sees the banks)."""
        assert isinstance(config, HashedNetConfig)
        weights = prunable_parameters(model, config.targets)
        sizes = layer_counts({name: w.shape for name, w in weights.items()}, config.density, config.distribution)
        modules = dict(model.named_modules())
        seen: set[int] = set()
        ignore = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        for name, weight in weights.items():
            n, k = weight.numel(), sizes[name]
            if k < 1:
                raise ValueError(f"sparsity.density {config.density} leaves {name} ({n} weights) an empty bank under "
                                 f"the {config.distribution} distribution; raise the density or exclude the layer")
            if id(weight) in seen:
                raise ValueError(f"{name} shares its weight with another target layer; exclude one of them")
            seen.add(id(weight))
            generator = seeded_generator(context.seed, 0, f"hashednet/assignment/{name}")
            assignment, sources = balanced_assignment(n, k, generator)
            initial = weight.detach().reshape(-1)[sources.to(weight.device)].view(k, 1)   # a copy
            counts = repeat_counts(n, k).to(device=weight.device, dtype=weight.dtype).view(k, 1)
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            parametrize.register_parametrization(modules[module_name], "weight",
                                                 TiedWeight(assignment.to(weight.device), counts, weight.shape))
            with torch.no_grad():
                modules[module_name].parametrizations["weight"].original.copy_(initial)
            prefix = f"{module_name}.parametrizations.weight.0." if module_name else "parametrizations.weight.0."
            ignore += [prefix + "assignment", prefix + "counts"]
        # The same on every rank by construction: spare DDP a broadcast of all assignments before every forward.
        model._ddp_params_and_buffers_to_ignore = ignore
        return model

    def __init__(self, config: MethodConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.ties = {name: tie for name, (tie, _) in tied_layers(model).items()}
        self.checksum = self._checksum()

    def target_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The banks, keyed by the names of the weights they replace."""
        banks = {name: bank for name, (_, bank) in tied_layers(model).items()}
        if not banks:
            raise RuntimeError("hashednet found no tied weights in the model: HashedNet.prepare_model must convert "
                               "it before the method is built")
        return banks

    # ------------------------------------------------------------ loop points
    def before_step(self, step: int) -> None:
        """With ``grad_rescale``: each entry's gradient (summed over its repeats, reduced over ranks) / its repeats."""
        if not self.config.grad_rescale:
            return
        for name, bank in self.params.items():
            if bank.grad is not None:         # None: the layer took no part in this step's forward
                bank.grad.div_(self.ties[name].counts)

    # ------------------------------------------------------------ reporting
    def layer_stats(self) -> list[LayerStat]:
        """numel: the layer's virtual weights N; kept: its bank size K; nonzero: non-zero bank entries."""
        return [LayerStat(name, self.ties[name].assignment.numel(), bank.numel(),
                          int(torch.count_nonzero(bank.detach()))) for name, bank in self.params.items()]

    def layer_targets(self) -> dict[str, float] | None:
        """K / N per layer: the bank sizes are fixed, so target and actual agree by construction."""
        return {name: bank.numel() / self.ties[name].assignment.numel() for name, bank in self.params.items()}

    def metrics(self) -> dict[str, float]:
        virtual = sum(tie.assignment.numel() for tie in self.ties.values())
        banks = sum(bank.numel() for bank in self.params.values())
        return {"hashednet/mean_repeats": virtual / banks, "hashednet/bank_size": float(banks)}

    # ------------------------------------------------------------ state
    def _checksum(self) -> str:
        """A digest of every layer's name, sizes and assignment."""
        digest = hashlib.blake2b(digest_size=16)
        for name, tie in self.ties.items():
            digest.update(f"{name}:{tie.assignment.numel()}:{tie.counts.numel()}:"
                          f"{assignment_digest(tie.assignment)};".encode())
        return digest.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["assignment_checksum"] = self.checksum
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("assignment_checksum")
        if saved != self.checksum:
            raise ValueError(f"hashednet: the checkpoint's weight assignment ({saved}) differs from this run's "
                             f"({self.checksum}); resume with the same seed and sparsity settings")
        super().load_state_dict(state)

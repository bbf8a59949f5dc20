"""The one contract of a sparsity method, and the registry that finds methods by name.

A method is a small class with its own typed config. The trainer calls it at fixed points of the loop:
``setup`` (initial masks, on a fresh start only; a resumed run calls ``load_state_dict`` instead), ``before_step``
(after gradients are ready, before the optimizer step: mask gradients, collect grow scores), ``after_step``
(scheduled mask updates), ``end_epoch`` (stripping, union cycles, iterative prunes) and ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pruning.masks import LayerStat, MaskSet, dense_stats
from pruning.registry import Registry
from pruning.targets import TargetConfig, prunable_parameters



@dataclass
class MethodConfig:
    """Settings every method shares; ``method`` selects the subclass through the registry."""

    method: str = "dense"
    targets: TargetConfig = field(default_factory=TargetConfig)

    @classmethod
    def config_variant(cls, data: dict[str, Any]) -> type[MethodConfig]:
        """The config class of the method named in ``data`` (used by the engine's config loader)."""
        name = data.get("method", "dense")
        return method_class(name).Config

    def check_run(self, run: RunFacts) -> None:
        """Refuse settings that cannot work with the rest of the run (raise ValueError naming ``sparsity.<key>``).

        Called while the whole config is checked, before any worker starts."""


@dataclass(frozen=True)
class RunFacts:
    """What a method config may check against the rest of the run before any worker starts."""

    epochs: int
    backend: str            # auto | none | ddp | deepspeed
    zero_stage: int
    precision: str


@dataclass
class MethodContext:
    """What a method may use besides the model: seeds, ranks, the loop's length and a source of batches."""

    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    steps_per_epoch: int = 1
    epochs: int = 1
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
    input_shape: tuple[int, ...] | None = None   # one sample's shape (C, H, W): data-free scorers need no batches

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run (at least 1)."""
        return max(1, self.steps_per_epoch * self.epochs)


class SparsityMethod:
    """Base class: holds the config, the unwrapped model, the optimizer and (for sparse methods) a MaskSet."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    name: ClassVar[str] = ""

    def __init__(self, config: MethodConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.context = context
        self.params = self.target_parameters(model)
        self.masks: MaskSet | None = None
        self._events: list[tuple[int, dict[str, float]]] = []

    def target_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this method acts on, by name: the prunable weights (a reparameterisation returns its own)."""
        return prunable_parameters(model, self.config.targets)

    # ------------------------------------------------------------ loop points
    @classmethod
    def prepare_model(cls, config: MethodConfig, model: nn.Module, context: MethodContext) -> nn.Module:
        """Change the model's structure before the optimizer is built (e.g. tie weights); most methods do not."""
        return model

    def setup(self) -> None:
        """Build the initial masks (fresh runs only)."""

    def before_step(self, step: int) -> None:
        """Called with gradients ready, before the optimizer step: pruned weights must get no update."""
        if self.masks is not None:
            self.masks.mask_grads_()

    def after_step(self, step: int) -> None:
        """Called after the optimizer step."""

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch's evaluation."""

    # ------------------------------------------------------------ reporting
    def layer_stats(self) -> list[LayerStat]:
        """Per-layer accounting of the prunable weights."""
        return self.masks.stats() if self.masks is not None else dense_stats(self.params)

    def layer_targets(self) -> dict[str, float] | None:
        """Target density per layer when the method has one (for target-vs-actual monitoring)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Method-specific scalars for TensorBoard (e.g. a threshold), logged at epoch ends."""
        return {}

    def record(self, t: int, values: dict[str, float]) -> None:
        """Keep scalars of one event (a mask update) at ``t`` steps done, for the trainer to log at that step."""
        self._events.append((t, values))

    def drain_events(self) -> list[tuple[int, dict[str, float]]]:
        """The events recorded since the last call (the trainer logs them after every step)."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict() if self.masks is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("masks")
        if saved is None:
            return
        if self.masks is None:
            self.masks = MaskSet(self.params)
        self.masks.load_state_dict(saved)
        self.masks.verify()


_METHODS: Registry[type[SparsityMethod]] = Registry("sparsity method", "method")


def register_method(name: str) -> Callable[[type[SparsityMethod]], type[SparsityMethod]]:
    """Class decorator: make a method available as ``sparsity.method: <name>``."""
    return _METHODS.register(name)


def method_class(name: str) -> type[SparsityMethod]:
    """The method registered as ``name``; a one-line error lists the valid names otherwise."""
    return _METHODS.get(name)


def list_methods() -> list[str]:
    return _METHODS.names()


def registered() -> Iterator[tuple[str, type[SparsityMethod]]]:
    return iter(_METHODS.items())


def build_method(config: MethodConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> SparsityMethod:
    """Instantiate the method named by ``config.method``."""
    return method_class(config.method)(config, model, optimizer, context)

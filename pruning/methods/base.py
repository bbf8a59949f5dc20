"""The one contract of a sparsity method, and the registry that finds methods by name.

A method is a small class with its own typed config. The trainer calls it at fixed points of the loop:

- before the optimizer exists: ``prepare_model`` (structure changes, e.g. tied weights) and ``make_optimizer`` (a
  method that is an optimizer, such as Gradient Rewiring, supplies it; the default is the configured one);
- ``setup`` (initial masks, on a fresh start only; a resumed run restores the masks and calls ``load_state_dict``);
- ``before_step`` (gradients ready, before the optimizer step: mask gradients, collect grow scores) and
  ``after_step`` (scheduled mask updates);
- at each epoch's end: ``decision_pass`` (optionally one pass over a split with forward hooks that live only during
  that pass, whose sums are reduced over ranks before the method decides), then ``end_epoch``.

A masked method (:class:`MaskedMethod`) owns a :class:`MaskSet` from construction; the trainer saves it at a fixed
top-level place of the checkpoint, so a method's ``state_dict`` holds only its own state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from pruning.masks import LayerStat, MaskSet, dense_stats
from pruning.scopes import BudgetError, Scope
from common.registry import Registry
from pruning.targets import TargetConfig, prunable_parameters


@dataclass
class MethodConfig:
    """Settings every method shares; ``method`` selects the subclass through the registry."""

    method: str = "dense"   # the registered method's name
    targets: TargetConfig = field(default_factory=TargetConfig)   # which weights are prunable (see sparsity.targets)

    @classmethod
    def config_variant(cls, data: dict[str, Any]) -> type[MethodConfig]:
        """The config class of the method named in ``data`` (used by the engine's config loader)."""
        name = data.get("method", "dense")
        return method_class(name).Config

    def check_run(self, run: RunFacts) -> None:
        """Refuse settings that cannot work with the rest of the run (raise ValueError naming ``sparsity.<key>``).

        Called while the whole config is checked, before any worker starts."""

    def check_length(self, steps_per_epoch: int, epochs: int) -> list[str]:
        """Refuse a setting that does nothing within a run of ``epochs`` x ``steps_per_epoch`` optimizer steps (an
        update period longer than the run, a ramp that ends after it: raise ValueError naming ``sparsity.<key>`` and
        the fix), and return one-line warnings for settings that take no effect but can be intended (a sweep over
        run lengths). The trainer calls it once the epoch's length is known, before the method is built."""
        return []


@dataclass(frozen=True)
class RunFacts:
    """What a method config may check against the rest of the run before any worker starts."""

    epochs: int
    backend: str            # auto | none | ddp | deepspeed
    zero_stage: int
    precision: str
    val_fraction: float = 0.0   # > 0: a held-out validation split exists (a decision pass may use it)
    optimizer: str = "sgd"      # optim.name: a method that reads the optimizer's settings (Adam's betas) checks it


Split = Literal["train", "val", "test"]
Probe = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DecisionPass:
    """A method's request for one pass over ``split`` before it decides something at an epoch's end.

    ``probes`` maps a module name of the unwrapped model to a function of that module's output returning a vector;
    the trainer sums each vector over every batch of the pass (hooks exist only during it), sums over ranks, and
    calls ``decide`` with the totals by module name, so every rank decides from the same numbers.
    """

    split: Split
    probes: Mapping[str, Probe]
    decide: Callable[[dict[str, torch.Tensor]], None]


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
    """Base class: holds the config, the unwrapped model, the optimizer and the parameters it acts on.

    Unmasked methods (dense, tied weights) derive from it directly and have ``masks = None``; masked ones derive
    from :class:`MaskedMethod`.
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    name: ClassVar[str] = ""
    masks: MaskSet | None = None

    def __init__(self, config: MethodConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.context = context
        self.params = self.target_parameters(model)
        self._events: list[tuple[int, dict[str, float]]] = []

    def target_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this method acts on, by name: the prunable weights (a reparameterisation returns its own)."""
        return prunable_parameters(model, self.config.targets)

    # ------------------------------------------------------------ before the optimizer exists
    @classmethod
    def prepare_model(cls, config: MethodConfig, model: nn.Module, context: MethodContext) -> nn.Module:
        """Change the model's structure before the optimizer is built (e.g. tie weights); most methods do not."""
        return model

    @classmethod
    def check_model(cls, config: MethodConfig, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Raise a one-line ValueError when the method cannot act on this model at all. The launcher calls it
        before any worker starts, on the model built on the meta device (no memory, no weights: structure only)."""

    @classmethod
    def make_optimizer(cls, config: MethodConfig, model: nn.Module,
                       default: Callable[[nn.Module], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """The optimizer of the run: ``default`` builds the configured one; a method that is an optimizer (Grad R)
        returns its own (refuse what cannot work with it in ``MethodConfig.check_run``)."""
        return default(model)

    # ------------------------------------------------------------ loop points
    def setup(self) -> None:
        """Build the initial masks (fresh runs only)."""

    def before_step(self, step: int) -> None:
        """Called with gradients ready, before the optimizer step."""

    def after_step(self, step: int) -> None:
        """Called after the optimizer step."""

    def decision_pass(self, epoch: int) -> DecisionPass | None:
        """A pass to run at the end of ``epoch``, before ``end_epoch`` (None: no pass, the default)."""
        return None

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch's evaluation (and decision pass, if one was asked for)."""

    # ------------------------------------------------------------ reporting
    def layer_stats(self) -> list[LayerStat]:
        """Per-layer accounting of the prunable weights."""
        return dense_stats(self.params)

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
        """The method's own state; masks are saved by the trainer at the checkpoint's top level."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; called after the masks (if any) are restored."""


class MaskedMethod(SparsityMethod):
    """A method whose sparsity is a MaskSet over its target parameters, built here: all ones until ``setup``."""

    masks: MaskSet

    def __init__(self, config: MethodConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.masks = MaskSet(self.params)

    def before_step(self, step: int) -> None:
        """Pruned weights get no update: their gradients are zeroed in one fused pass."""
        self.masks.mask_grads_()

    def layer_stats(self) -> list[LayerStat]:
        return self.masks.stats()

    def check_budget(self, scope: Scope, density: float) -> None:
        """The masks must hold ``scope``'s exact budgets at ``density``: a miss is a bug, not an approximation."""
        try:
            scope.check(dict(self.masks.items()), density)
        except BudgetError as error:
            raise BudgetError(f"{self.name} missed its target: {error}") from None


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

"""One level of iterative magnitude pruning (lottery tickets): a static mask from the previous level's trained weights.

Level 0 trains densely and records the weights to rewind to (the whole model state at ``rewind_step``: 0 is the
initialisation, later steps are "late rewinding"). Level l > 0 reads the previous level's end state (a local file the
driver ``engine.lottery`` writes: trained weights, masks, rewind weights), keeps the largest |W| of the weights still
unpruned, exactly round((1 - prune_fraction)^l * N) of them (global) or of each layer's size (layer), sets the model
to the rewind weights (or keeps the trained ones when ``rewind_step`` is null) and trains under that fixed mask.
The rewind weights travel in the method state, so they reach every later level and survive a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from pruning.methods.base import MaskedMethod, MethodConfig, MethodContext, register_method
from pruning.schedules import Time, check_time, to_steps
from pruning.scopes import Scope, build_scope, shapes_of
from pruning.timing import LevelDensity

LOTTERY_SCOPES = {"global": "global", "layer": "layer"}   # config word -> registered scope


@dataclass
class LotteryConfig(MethodConfig):
    """levels: pruning levels after the dense level 0; prune_fraction: of the remaining weights, per level.

    ``level`` and ``previous`` are set by the lottery driver for each level's run.
    """

    levels: int = 10
    prune_fraction: float = 0.2
    scope: Literal["global", "layer"] = "global"   # global: one threshold; layer: each layer alike
    rewind_step: Time | None = 0          # steps or a fraction of a level's training; null: no rewinding
    level: int = 0   # set by the lottery driver: this run's level
    previous: str | None = None           # local file: the previous level's trained weights, masks, rewind weights

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError(f"levels must be at least 1, got {self.levels}")
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1) (the share of remaining weights pruned per level), "
                             f"got {self.prune_fraction}")
        if self.scope not in LOTTERY_SCOPES:
            raise ValueError(f"scope must be global or layer, got {self.scope!r}")
        if self.rewind_step is not None:
            check_time("rewind_step", self.rewind_step, zero_ok=True)
        if not 0 <= self.level <= self.levels:
            raise ValueError(f"level must be in [0, levels={self.levels}], got {self.level}")
        if (self.level > 0) != (self.previous is not None):
            raise ValueError("previous must name the previous level's end state exactly when level > 0; run the "
                             "levels with `python -m launcher lottery CONFIG`")

    def check_length(self, steps_per_epoch: int, epochs: int) -> list[str]:
        """Rewinding to a step after a level's end would never record the weights to rewind to."""
        total = steps_per_epoch * epochs
        if self.rewind_step is not None and to_steps(self.rewind_step, total) > total:
            raise ValueError(f"sparsity.rewind_step={self.rewind_step} is after a level's last step ({total} = "
                             f"{steps_per_epoch} steps per epoch x {epochs} epochs); give a smaller step or a "
                             "fraction of training (a float)")
        return []


@register_method("lottery_level")
class LotteryLevel(MaskedMethod):
    """A fixed mask for a whole level; level 0 is dense and records the rewind weights."""

    Config = LotteryConfig
    config: LotteryConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        total = context.total_steps
        rewind = self.config.rewind_step
        self.rewind_at = to_steps(rewind, total) if rewind is not None else None
        if self.rewind_at is not None and self.rewind_at > total:
            raise ValueError(f"rewind_step ({self.rewind_at} steps) is after a level's last step ({total})")
        self.rewind: dict[str, torch.Tensor] | None = None
        self.scope: Scope = build_scope(LOTTERY_SCOPES[self.config.scope], shapes_of(self.params))
        self.levels = LevelDensity(self.config.prune_fraction)

    def density(self) -> float:
        """Fraction kept at this level: (1 - prune_fraction)^level."""
        return self.levels.at(self.config.level)

    def setup(self) -> None:
        if self.config.previous is None:
            if self.rewind_at == 0:
                self._capture()
            return
        previous = torch.load(self.config.previous, map_location="cpu", weights_only=True)
        trained, kept = previous["weights"], previous["masks"]
        if set(kept) != set(self.params):
            raise ValueError(f"previous: {self.config.previous} masks other layers than this model's prunable ones; "
                             "keep the model and sparsity.targets the same across levels")
        self.rewind = previous["rewind"]
        if self.rewind_at is not None and self.rewind is None:
            raise ValueError("rewind_step is set but level 0 recorded no rewind weights; keep rewind_step the same "
                             "across levels")
        # the largest trained |W| among the weights the previous level kept: masks nest
        new = self.scope.select({name: trained[name].abs() for name in self.params}, self.density(), kept)
        start = self.rewind if self.rewind_at is not None else trained
        self.model.load_state_dict(start)
        self.masks.update({name: m.to(self.params[name].device) for name, m in new.items()},
                          optimizer=self.optimizer)
        self.check_budget(self.scope, self.density())

    def after_step(self, step: int) -> None:
        if self.config.previous is None and self.rewind_at == step + 1:
            self._capture()

    def _capture(self) -> None:
        """Record the whole model state (weights and buffers) to rewind later levels to."""
        self.rewind = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def layer_targets(self) -> dict[str, float] | None:
        return self.scope.targets(self.density())

    def metrics(self) -> dict[str, float]:
        return {"lottery_level": float(self.config.level), "target_density": self.density()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rewind"] = self.rewind
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rewind = state.get("rewind")

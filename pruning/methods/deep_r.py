"""Deep Rewiring (Bellec et al., ICLR 2018) and soft Deep R (ALGORITHMS.md section 3).

Every connection k has a fixed sign s_k (the sign of its initial weight) and a parameter theta_k; it is active when
theta_k > 0, and then its weight is w_k = s_k theta_k. The optimizer steps the active weights as usual (its gradient
step on w is a step on theta = s w); after every step the method adds the rest of the Deep R update in theta-space,

    theta <- theta - eta * l1 + sqrt(2 eta T) * nu,      nu ~ N(0, 1) from the (seed, step, layer) stream,

with eta the learning rate of the step just taken (so the schedule drives the noise too), T the temperature and l1 the
L1 prior; a connection whose theta falls to zero or below (its weight's sign flips away from s, or it reaches zero)
dies.

* **Deep R** keeps each layer's number of active connections fixed: as many as died are regrown at random dormant
  positions (the just-dead included, as in the paper's algorithm), with theta = ``grow_magnitude``, i.e. weight
  s * grow_magnitude and fresh optimizer state. A regrown connection is therefore alive and keeps its sign into the
  next step, where its gradient, the noise and the prior decide (with no help from the gradient, a connection at
  1e-12 dies about half the time, as in Bellec's code); the DSR reference code sets it to zero, which kills it at
  the next check whatever the gradient says (a bug, not reproduced).
* **Soft Deep R** keeps theta for every connection: dormant ones do a random walk (noise only, no gradient and no
  prior) clamped below at theta_min = -T max_s / (l1 (1 - max_s)) with max_s = 1 - density, and come back when theta
  crosses zero, with weight s * theta. The number of active connections is free; a layer about to lose its last one
  keeps the connection with the largest theta (at ``grow_magnitude``), so no layer is ever emptied.
  ALGORITHMS.md writes theta_min as -(0.5 a^2 max_s) / (l1 (1 - max_s)) in the reference code's noise amplitude
  a = sqrt(2 T); it is the same number.

The noise and prior are applied to the weights directly (as Bellec's code does), not through the optimizer, so
momentum never carries them; written through ``MaskSet.set_values_`` they reach DeepSpeed's fp32 masters too. The
update is far below bf16 and fp16 resolution, so under DeepSpeed (whose module weights are then half precision and
are written back over the fp32 masters) only fp32 is accepted; DDP with autocast keeps fp32 weights and is fine.

``style: spiking`` is Deep R as the Gradient Rewiring work runs it on spiking networks (ALGORITHMS.md section 5), the
same maths with three differences, all in this option:

* the optimizer is Adam (``optim.name: adam``) and the prior and noise use Adam's step size lr_t = lr / (1 - beta1^t)
  (t = steps done): theta -= l1 * lr_t on active connections, noise T_noise * sqrt(lr_t) * N(0, 1) with
  T_noise = sqrt(2 T) (that work's ``T``; its scripts never set it, so it was 0: ``temperature`` defaults to 0 here,
  the faithful value, and is a real option);
* every connection starts alive (the net starts dense, soft Deep R with theta = |w0|);
* hard Deep R does not keep the active count fixed: when a layer's dormant fraction f exceeds max_s = 1 - density,
  each dormant connection revives with probability (f - max_s) / f (seeded by (seed, step, layer), so every rank
  draws the same), at theta = ``grow_magnitude`` (default 1e-8, the reference's eps) with its **stored sign**. The
  reference writes +eps whatever the sign, so a revived negative connection reads as a sign flip and dies at the
  next step (a bug, not reproduced). Unlike the reference, whose Adam moments keep accumulating at dormant positions,
  dormant gradients are masked (the project's rule), so a revived connection starts with zero moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pruning.agreement import seeded_generator
from pruning.methods.base import MaskedMethod, MethodConfig, MethodContext, RunFacts, register_method
from pruning.methods.grad_rewiring import EpochRewiring
from pruning.scopes import Scope, build_scope, random_masks, shapes_of
from pruning.selection import keep_top_k, seeded_uniform
from pruning.timing import UpdatePeriods


@dataclass
class DeepRConfig(MethodConfig):
    """density: fraction of connections active (initially, and always for Deep R); distribution of the initial
    per-layer budgets; temperature T and l1 prior of the theta update (Bellec's MNIST script: l1 1e-5 and noise
    amplitude 1e-5 per unit learning rate at lr 0.5, i.e. T = 2.5e-11); grow_magnitude: theta of a regrown
    connection (Bellec's code: 1e-12); no rewiring from ``stop_epoch`` on (null: never stop); log_every: steps
    between logged rewiring counts; style: bellec, or spiking (the Gradient Rewiring work's Adam-based Deep R, see
    the module docstring), which also changes the defaults of temperature (0) and grow_magnitude (1e-8)."""

    density: float = 0.1
    distribution: Literal["uniform", "er", "erk"] = "uniform"   # initial per-layer budgets
    temperature: float | None = None        # None: 1e-10 (bellec), 0 (spiking, the published scripts' value)
    l1: float = 1e-5   # l1 prior on active connections
    grow_magnitude: float | None = None     # None: 1e-12 (bellec), 1e-8 (spiking, the reference's eps)
    stop_epoch: int | None = None   # no rewiring from this epoch on; null: never stop
    log_every: int = 100
    style: Literal["bellec", "spiking"] = "bellec"    # spiking: Adam step sizes, dense start, excess revival

    def __post_init__(self) -> None:
        if self.style not in ("bellec", "spiking"):
            raise ValueError(f"style must be bellec or spiking, got {self.style!r}")
        spiking = self.style == "spiking"
        if self.temperature is None:
            self.temperature = 0.0 if spiking else 1e-10
        if self.grow_magnitude is None:
            self.grow_magnitude = 1e-8 if spiking else 1e-12
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density must be in (0, 1) (the fraction of connections active), got {self.density}")
        if self.distribution not in ("uniform", "er", "erk"):
            raise ValueError(f"distribution must be uniform, er or erk, got {self.distribution!r}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if self.l1 < 0.0:
            raise ValueError(f"l1 must be non-negative, got {self.l1}")
        if not self.grow_magnitude > 0.0:
            raise ValueError(f"grow_magnitude must be positive (a regrown connection must be alive), "
                             f"got {self.grow_magnitude}")
        if self.stop_epoch is not None and self.stop_epoch < 0:
            raise ValueError(f"stop_epoch must be non-negative or null, got {self.stop_epoch}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be at least 1 step, got {self.log_every}")

    def check_length(self, steps_per_epoch: int, epochs: int) -> list[str]:
        """No rewiring at all fails; a stop after the run's end, or a log interval longer than it, warns."""
        if self.stop_epoch == 0:
            raise ValueError(f"sparsity.stop_epoch=0: {self.method} would never rewire; set sparsity.stop_epoch=null "
                             "(or later), or use a static method")
        notes = []
        if self.stop_epoch is not None and self.stop_epoch > epochs:
            notes.append(f"sparsity.stop_epoch={self.stop_epoch} is after the run's {epochs} epochs: rewiring never "
                         "stops")
        total = steps_per_epoch * epochs
        if self.log_every > total:
            notes.append(f"sparsity.log_every={self.log_every} is longer than the run ({total} steps): no rewiring "
                         "count is ever logged")
        return notes

    def check_run(self, run: RunFacts) -> None:
        if self.style == "spiking" and run.optimizer not in ("adam", "adamw"):
            raise ValueError(f"sparsity.style spiking takes Adam's step size lr / (1 - beta1^t), but optim.name is "
                             f"{run.optimizer}: set optim.name=adam")
        if run.backend == "deepspeed" and run.precision != "fp32":
            raise ValueError(f"sparsity.method {self.method} moves weights by about 1e-6 per step, below "
                             f"{run.precision}'s resolution: under DeepSpeed it would write rounded values over the "
                             "fp32 master weights; use train.precision=fp32 with DeepSpeed, or parallel.backend=ddp "
                             "(autocast keeps fp32 weights)")


@register_method("deep_r")
class DeepR(MaskedMethod):
    """Deep R: signed connections, noisy L1-regularised theta, sign-flip deaths, random regrowth per layer."""

    Config = DeepRConfig
    config: DeepRConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        cfg = self.config
        self.rewiring = UpdatePeriods(1, [], [], cfg.stop_epoch, context.steps_per_epoch, context.epochs)
        self.scope: Scope = build_scope("layer", shapes_of(self.params), cfg.distribution)
        self.signs: dict[str, torch.Tensor] = {}
        self.died = {name: 0 for name in self.params}      # since the last logged event
        self.grown = {name: 0 for name in self.params}
        self.total_died = 0
        self.epoch_rewiring = EpochRewiring()
        # the param group of each layer, found now: DeepSpeed later swaps the groups' tensors for its partitions
        where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]} if optimizer else {}
        missing = [name for name, p in self.params.items() if optimizer is not None and id(p) not in where]
        if missing:
            raise ValueError(f"{self.name}: {missing[0]} is not trained by the optimizer, so it has no learning rate "
                             "for the Deep R update; exclude it with sparsity.targets.exclude")
        self.group_index = {name: where[id(p)] for name, p in self.params.items() if id(p) in where}

    # ------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Signs from the initial weights (zero counts as +), then a random mask at ``density`` (style spiking: every
        connection with a non-zero weight alive)."""
        self.signs = {name: self._sign_of(p.detach()) for name, p in self.params.items()}
        if self.config.style == "spiking":
            start = {name: p.detach() != 0 for name, p in self.params.items()}
        else:
            start = random_masks(self.scope, self.config.density, self.context.seed)
        self.masks.update(start, optimizer=self.optimizer)
        self.epoch_rewiring.start(self.masks.items())

    @staticmethod
    def _sign_of(weight: torch.Tensor) -> torch.Tensor:
        return torch.where(weight < 0, -1.0, 1.0).to(weight.dtype)

    # ------------------------------------------------------------ the update
    def learning_rates(self, step: int) -> dict[str, float]:
        """The step size of the step just taken (step ``step``), per layer: the learning rate of the weight's param
        group, divided by Adam's 1 - beta1^t (t = step + 1) under style spiking."""
        if self.optimizer is None:
            raise RuntimeError(f"{self.name} needs the optimizer: its noise and prior scale with the learning rate")
        groups = self.optimizer.param_groups
        rates = {}
        for name, index in self.group_index.items():
            group = groups[index]
            rate = float(group["lr"])
            if self.config.style == "spiking":
                if "betas" not in group:
                    raise ValueError(f"{self.name} with style spiking needs an Adam optimizer (optim.name=adam)")
                rate /= 1.0 - float(group["betas"][0]) ** (step + 1)
            rates[name] = rate
        return rates

    def theta_step(self, step: int, name: str, theta: torch.Tensor, active: torch.Tensor, lr: float) -> torch.Tensor:
        """theta + sqrt(2 lr T) nu - lr l1 [active]: noise everywhere it is given, the prior on active connections."""
        cfg = self.config
        out = theta - (lr * cfg.l1) * active.to(theta.dtype)
        sigma = math.sqrt(2.0 * lr * cfg.temperature)
        if sigma > 0.0:
            noise = torch.randn(theta.shape, generator=seeded_generator(self.context.seed, step, f"deepr/noise/{name}"))
            out = out + sigma * noise.to(device=theta.device, dtype=theta.dtype)
        return out

    def after_step(self, step: int) -> None:
        if not self.rewiring.is_due(step + 1):
            return
        lrs = self.learning_rates(step)
        new, values = {}, {}
        with torch.no_grad():
            for name, param in self.params.items():
                new[name], values[name] = self.rewire(step, name, param.detach(), lrs[name])
        changed = {n: m for n, m in new.items() if not torch.equal(m, self.masks[n])}
        if changed:
            for name, change in self.masks.update(changed, optimizer=self.optimizer, grow_values=values).items():
                self.died[name] += change.dropped
                self.grown[name] += change.grown
                self.total_died += change.dropped
        self.masks.set_values_(values)
        if (step + 1) % self.config.log_every == 0:
            self.record(step + 1, self._event())

    def rewire(self, step: int, name: str, weight: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(new mask, new weight values) of one layer: deaths by theta <= 0, then the regrowth."""
        mask, sign = self.masks[name], self.signs[name]
        theta = self.theta_step(step, name, sign * weight, mask, lr)
        alive = mask & (theta > 0)
        grown = self.regrowth(step, name, alive, died=int(mask.sum()) - int(alive.sum()))
        if grown is None:
            return alive, sign * theta.clamp_min(0.0)
        theta = torch.where(grown, torch.full_like(theta, self.config.grow_magnitude), theta.clamp_min(0.0))
        return alive | grown, sign * theta      # the stored sign: a regrown connection is alive

    def regrowth(self, step: int, name: str, alive: torch.Tensor, died: int) -> torch.Tensor | None:
        """Dormant positions to revive (None: none). Bellec: as many as died, at random. Style spiking: each dormant
        one with probability (f - max_s) / f when the dormant fraction f exceeds max_s = 1 - density."""
        if self.config.style == "spiking":
            dormant = ~alive
            fraction = int(dormant.sum()) / dormant.numel()
            excess = fraction - (1.0 - self.config.density)
            if excess <= 0:
                return None
            draw = seeded_uniform(alive, self.context.seed, step, f"deepr/revive/{name}")
            grown = dormant & (draw < excess / fraction)
            return grown if bool(grown.any()) else None
        if died == 0:
            return None
        scores = seeded_uniform(alive, self.context.seed, step, f"deepr/grow/{name}").masked_fill(alive, -math.inf)
        return keep_top_k(scores, died)

    def end_epoch(self, epoch: int) -> None:
        self.epoch_rewiring.end_epoch(self.masks.items())

    # ------------------------------------------------------------ reporting
    def _event(self) -> dict[str, float]:
        out: dict[str, float] = {"deepr/died_total": float(self.total_died)}
        for name, mask in self.masks.items():
            out[f"deepr/died/{name}"] = float(self.died[name])
            out[f"deepr/grown/{name}"] = float(self.grown[name])
            out[f"deepr/density/{name}"] = int(mask.sum()) / mask.numel()
        self.died = {name: 0 for name in self.params}
        self.grown = {name: 0 for name in self.params}
        return out

    def layer_targets(self) -> dict[str, float] | None:
        return self.scope.targets(self.config.density)

    def metrics(self) -> dict[str, float]:
        return {"deepr/died_total": float(self.total_died), **self.epoch_rewiring.metrics(self.model, self.params)}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["signs"] = {name: (s > 0).cpu() for name, s in self.signs.items()}
        state["total_died"] = self.total_died
        state["rewiring"] = self.epoch_rewiring.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        signs = state.get("signs")
        if signs is None or set(signs) != set(self.params):
            raise ValueError(f"the checkpoint has no connection signs for {self.name}; resume with the same method")
        self.signs = {name: torch.where(signs[name].to(p.device), 1.0, -1.0).to(p.dtype)
                      for name, p in self.params.items()}
        self.total_died = int(state.get("total_died", 0))
        if "rewiring" in state:
            self.epoch_rewiring.load_state_dict(state["rewiring"], dict(self.masks.items()))
        else:       # a checkpoint from before the per-epoch counts: count from here
            self.epoch_rewiring.start(self.masks.items())


@dataclass
class SoftDeepRConfig(DeepRConfig):
    """Deep R's settings; density also sets the dormant clip theta_min (max_s = 1 - density), so l1 must be > 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.l1 > 0.0:
            raise ValueError(f"l1 must be positive for soft_deep_r (theta_min divides by it), got {self.l1}")


@register_method("soft_deep_r")
class SoftDeepR(DeepR):
    """Soft Deep R: theta for every connection, dormant ones random-walk above theta_min; the active count is free."""

    Config = SoftDeepRConfig
    config: SoftDeepRConfig

    def __init__(self, config: MethodConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.theta: dict[str, torch.Tensor] = {}
        d = self.config.density      # theta_min = -T max_s / (l1 (1 - max_s)), max_s = 1 - d (Bellec's clip)
        self.theta_min = -self.config.temperature * (1.0 - d) / (self.config.l1 * d)

    def setup(self) -> None:
        """As Deep R; dormant connections start at theta ~ U(theta_min, 0) (Bellec's initialisation)."""
        super().setup()
        self.theta = {}
        for name, param in self.params.items():
            start = seeded_uniform(param, self.context.seed, 0, f"deepr/theta0/{name}").to(param.dtype) * self.theta_min
            self.theta[name] = torch.where(self.masks[name], self.signs[name] * param.detach(), start)

    def rewire(self, step: int, name: str, weight: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        mask, sign = self.masks[name], self.signs[name]
        theta = torch.where(mask, sign * weight, self.theta[name])          # active ones took the optimizer's step
        theta = self.theta_step(step, name, theta, mask, lr).clamp_min(self.theta_min)
        alive = theta > 0
        if not bool(alive.any()):                                            # never empty a layer
            best = torch.argmax(theta.reshape(-1))
            theta.view(-1)[best] = self.config.grow_magnitude
            alive = theta > 0
        self.theta[name] = theta
        return alive, sign * theta.clamp_min(0.0)

    def layer_targets(self) -> dict[str, float] | None:
        return None        # the active count is free under soft Deep R

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out["deepr/theta_min"] = self.theta_min
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["theta"] = {name: t.cpu() for name, t in self.theta.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.theta = {name: state["theta"][name].to(p.device, p.dtype) for name, p in self.params.items()}

"""Gradient Rewiring (Grad R; Chen et al., IJCAI 2021; ALGORITHMS.md section 5): pruning as an optimizer.

Every prunable weight is w = s * max(theta, 0) with a sign s fixed at the start (s = sign(w0), zero counted as +) and
a hidden parameter theta, first |w0|. Each step, with g = dL/dw the gradient of the effective weight:

    Adam moments on g (torch's Adam, betas and eps from the optim section)
    s * theta -= lr * m_hat / (sqrt(v_hat) + eps)              the Adam step, with no ReLU derivative: a pruned
                                                                connection (theta <= 0) still gets its gradient and
                                                                grows back when the gradient pushes it up
    theta -= alpha * lr / (1 - beta1^t) * sign(theta - mu)      the prior step (not preconditioned), with
                                                                mu = ln(2 (1 - s_target)) / alpha
    w = s * max(theta, 0)

so a connection is alive exactly while theta > 0 and its weight is exactly zero otherwise. Both the Adam step and the
prior are gradient steps taken at the same theta (the paper's update of theta by the gradient of the loss plus the
Laplace prior; the reference code evaluates sign(theta - mu) before the Adam step too); the order in which the two
are added does not matter. Norm layers and every other parameter that is not a prunable weight are trained by plain
torch Adam with the same settings, and never pruned. The sign of an exactly-zero initial weight is taken as +, so the
connection can grow (the reference's torch.sign gives 0 there, which kills it for good).

The optimizer keeps, per prunable weight, ``hidden`` = s * theta (the signed variable the Adam step moves, so the
Adam step is torch's own Adam kernel on it, fused or foreach as configured) and ``sign``; ``theta(param)`` returns
theta. The prior and the write of w cost four more passes over each weight (about 1.5x torch's foreach Adam step,
2-3x its fused one; docs/spiking.md); ``compile: true`` runs the same maths as one torch.compile'd pass per weight
instead. It writes w itself, so pruned weights are exactly zero after every step with no gradient masking, and the
method only reads the masks off the weights (w != 0) after each step, checks them across ranks at every epoch's end
and counts connections pruned and regrown per epoch. Under DDP every rank steps the same all-reduced gradients from
the same state, so weights, theta and masks stay identical; DeepSpeed is accepted at ZeRO stage 0 in fp32 only
(the optimizer then steps the module's own parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam

from pruning.methods.base import MaskedMethod, MethodConfig, MethodContext, RunFacts, register_method
from pruning.targets import prunable_parameters


@dataclass
class GradRewiringConfig(MethodConfig):
    """penalty: alpha, the prior's strength (the Gradient Rewiring scripts' -penalty, 1e-3 in the published runs;
    0 turns the prior off); target_sparsity: s_target in [0.5, 1), which places the prior's centre
    mu = ln(2 (1 - s_target)) / alpha. The learning rate, betas, eps and weight decay are the optim section's (which
    must name adam). compile: run the rewired weights' whole update as one torch.compile'd elementwise pass (the same
    maths, rounded differently, so not bit-identical to the eager step; compiled once per run, seconds, and needs a
    C++ compiler on the CPU), which brings the step near Adam's."""

    penalty: float = 1e-3
    target_sparsity: float = 0.95
    compile: bool = False       # one torch.compile'd pass per weight instead of torch's Adam kernel plus four passes

    def __post_init__(self) -> None:
        if not self.penalty >= 0.0:
            raise ValueError(f"penalty must be >= 0 (alpha, the prior's strength), got {self.penalty}")
        if not 0.5 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0.5, 1) (s_target of the prior), got {self.target_sparsity}")

    def check_run(self, run: RunFacts) -> None:
        if run.optimizer != "adam":
            raise ValueError(f"sparsity.method grad_rewiring is Adam with a sparsity prior, not {run.optimizer}: set "
                             "optim.name=adam (optim.lr, betas, eps and weight_decay are its settings)")
        if run.backend == "deepspeed" and (run.zero_stage != 0 or run.precision != "fp32"):
            raise ValueError(f"sparsity.method grad_rewiring runs under DeepSpeed only at parallel.zero_stage=0 with "
                             f"train.precision=fp32 (got stage {run.zero_stage}, {run.precision}): it keeps theta per "
                             "weight; use those settings or parallel.backend=ddp")


def prior_centre(penalty: float, target_sparsity: float) -> float:
    """mu = ln(2 (1 - s_target)) / alpha: the centre of the Laplace prior on theta (0 at s_target = 0.5)."""
    return math.log(2.0 * (1.0 - target_sparsity)) / penalty


def rewired_update(hidden: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                   exp_avg_sqs: list[torch.Tensor], signs: list[torch.Tensor], weights: list[torch.Tensor],
                   step_size: torch.Tensor, prior: torch.Tensor, mu: torch.Tensor, new1: torch.Tensor,
                   beta2: torch.Tensor, new2: torch.Tensor, eps: torch.Tensor, bias2_root: torch.Tensor) -> None:
    """The whole Grad R update of ``GradRewiringAdam.step`` as elementwise code, for torch.compile to fuse into one
    pass per tensor (reading g, m, v, hidden, s; writing m, v, hidden, w). step_size = lr / (1 - beta1^t), prior =
    alpha * step_size, new1 = 1 - beta1, new2 = 1 - beta2 (taken in double precision, as torch's Adam does),
    bias2_root = sqrt(1 - beta2^t); scalars are 0-d tensors, so a new step does not recompile."""
    for h, g, m, v, s, w in zip(hidden, grads, exp_avgs, exp_avg_sqs, signs, weights):
        direction = torch.sign(h - s * mu)                  # s * sign(theta - mu), at theta before this step
        m.lerp_(g, new1)
        v.mul_(beta2).add_(new2 * g * g)
        h.sub_(step_size * m / (v.sqrt() / bias2_root + eps) + prior * direction)
        w.copy_(torch.where(h * s > 0, h, 0.0))


class GradRewiringAdam(torch.optim.Optimizer):
    """Adam whose groups with ``rewire: True`` step the hidden theta of sign-fixed weights (see the module docstring);
    other groups are plain Adam. ``foreach`` / ``fused`` choose torch's Adam kernel, as for ``torch.optim.Adam``."""

    def __init__(self, params: Iterable[Any], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, penalty: float = 1e-3, target_sparsity: float = 0.95,
                 foreach: bool | None = None, fused: bool | None = None, compile: bool = False) -> None:
        if not lr > 0.0 or not eps > 0.0 or weight_decay < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"bad Adam settings: lr {lr}, betas {betas}, eps {eps}, weight_decay {weight_decay}")
        GradRewiringConfig(penalty=penalty, target_sparsity=target_sparsity)      # the same range checks
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, penalty=penalty,
                        target_sparsity=target_sparsity, rewire=True, steps_done=0)
        super().__init__(params, defaults)
        self.foreach, self.fused = foreach, fused
        self._compiled: Callable[..., None] | None = torch.compile(rewired_update, dynamic=False) if compile else None
        self._derived: dict[torch.Tensor, tuple[torch.Tensor, ...]] = {}

    # ------------------------------------------------------------ state
    def _state(self, param: torch.Tensor, rewire: bool) -> dict[str, Any]:
        state = self.state[param]
        if not state:      # first step: s = sign(w0) (zero counts as +), hidden = s * |w0| = w0
            on_device = bool(self.fused)
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if rewire:
                state["sign"] = torch.where(param < 0, -1.0, 1.0).to(param.dtype)
                state["hidden"] = param.detach().clone(memory_format=torch.preserve_format)
        return state

    def _derived_of(self, param: torch.Tensor, group: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """(s * mu, lower, upper, scratch) of a weight, derived from its sign and kept out of the state (rebuilt after
        a load): sign(hidden - s * mu) = s * sign(theta - mu), and w = clamp(hidden, lower, upper) is s * max(theta, 0)
        in one pass; the scratch holds the prior's direction without a fresh allocation every step (large CPU
        allocations are page-faulted in anew each time)."""
        if param not in self._derived:
            sign = self.state[param]["sign"]
            positive = sign > 0
            mu = prior_centre(group["penalty"], group["target_sparsity"]) if group["penalty"] > 0 else 0.0
            self._derived[param] = (sign * mu, torch.where(positive, 0.0, -math.inf).to(sign.dtype),
                                    torch.where(positive, math.inf, 0.0).to(sign.dtype), torch.empty_like(sign))
        return self._derived[param]

    def theta(self, param: torch.Tensor) -> torch.Tensor:
        """theta of a prunable weight (a copy); |w| where the weight is alive, <= 0 where it is pruned."""
        state = self.state[param]
        if "hidden" not in state:
            return param.detach().abs()
        return state["sign"] * state["hidden"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._derived.clear()

    # ------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            rewire = bool(group["rewire"])
            states = [self._state(p, rewire) for p in params]
            grads = [p.grad for p in params]
            beta1, beta2 = group["betas"]
            group["steps_done"] += 1
            decay = group["weight_decay"]
            targets = params
            if rewire:
                targets = [s["hidden"] for s in states]
                if decay:       # L2 on the effective weight, as the reference's Adam adds it to g
                    grads = torch._foreach_add(grads, params, alpha=decay)
                    decay = 0.0
                if self._compiled is not None:
                    self._compiled_step(group, params, grads, states)
                    continue
                if group["penalty"] > 0:        # the prior at theta before this step (see the module docstring)
                    direction = []
                    for param, hidden in zip(params, targets):
                        centre, _, _, scratch = self._derived_of(param, group)
                        direction.append(torch.sub(hidden, centre, out=scratch))
                    torch._foreach_sign_(direction)
                    scale = group["penalty"] * group["lr"] / (1.0 - beta1 ** group["steps_done"])
                    torch._foreach_add_(targets, direction, alpha=-scale)
            adam(targets, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                 [s["step"] for s in states], foreach=self.foreach, fused=self.fused, amsgrad=False, beta1=beta1,
                 beta2=beta2, lr=group["lr"], weight_decay=decay, eps=group["eps"], maximize=False)
            if rewire:
                for param, hidden in zip(params, targets):
                    _, lower, upper, _ = self._derived_of(param, group)
                    torch.clamp(hidden, lower, upper, out=param)
        return loss

    def _compiled_step(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                       states: list[dict[str, Any]]) -> None:
        assert self._compiled is not None
        beta1, beta2 = group["betas"]
        t = group["steps_done"]
        torch._foreach_add_([s["step"] for s in states], 1.0)     # Adam's own count, kept for the checkpoint
        step_size = group["lr"] / (1.0 - beta1**t)
        mu = prior_centre(group["penalty"], group["target_sparsity"]) if group["penalty"] > 0 else 0.0
        device = params[0].device
        scalars = [torch.tensor(x, dtype=torch.float32, device=device) for x in
                   (step_size, group["penalty"] * step_size, mu, 1.0 - beta1, beta2, 1.0 - beta2, group["eps"],
                    math.sqrt(1.0 - beta2**t))]
        self._compiled(
            [s["hidden"] for s in states], grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["sign"] for s in states], params, *scalars)


class EpochRewiring:
    """Connections pruned and regrown between two epoch ends, per layer and in total (what the Gradient Rewiring
    scripts log as prune_cnt / regrow_cnt), and connectivity: the fraction of prunable weights that are non-zero, and
    of all parameters counting every other one (norm layers) as connected, as the scripts print both."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}

    def start(self, masks: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.before = {name: mask.clone() for name, mask in masks}

    def end_epoch(self, masks: Iterable[tuple[str, torch.Tensor]]) -> None:
        regrown = pruned = 0
        counts: dict[str, float] = {}
        for name, mask in masks:
            before = self.before[name]
            came_back, went = int((mask & ~before).sum()), int((before & ~mask).sum())
            counts[f"rewiring/regrown/{name}"], counts[f"rewiring/pruned/{name}"] = float(came_back), float(went)
            regrown, pruned = regrown + came_back, pruned + went
            self.before[name] = mask.clone()
        self.counts = {"rewiring/regrown": float(regrown), "rewiring/pruned": float(pruned), **counts}

    def metrics(self, model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, float]:
        prunable = sum(p.numel() for p in params.values())
        alive = sum(int(torch.count_nonzero(p.detach())) for p in params.values())
        total = sum(p.numel() for p in model.parameters())
        return {"connectivity": alive / max(1, prunable),
                "connectivity_all": (alive + total - prunable) / max(1, total), **self.counts}

    def state_dict(self) -> dict[str, Any]:
        return {"before": {name: mask.cpu() for name, mask in self.before.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any], like: Mapping[str, torch.Tensor]) -> None:
        if set(state["before"]) != set(like):
            raise ValueError("the checkpoint's rewiring counts are for other layers; resume with the same model and "
                             "sparsity.targets")
        self.before = {name: state["before"][name].to(like[name].device, torch.bool) for name in like}
        self.counts = {key: float(value) for key, value in state["counts"].items()}


@register_method("grad_rewiring")
class GradRewiring(MaskedMethod):
    """Grad R: the optimizer does the pruning and the regrowth; the masks follow the weights (w != 0)."""

    Config = GradRewiringConfig
    config: GradRewiringConfig

    def __init__(self, config: MethodConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 context: MethodContext) -> None:
        super().__init__(config, model, optimizer, context)
        self.rewiring = EpochRewiring()

    @classmethod
    def make_optimizer(cls, config: MethodConfig, model: nn.Module,
                       default: Callable[[nn.Module], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """Grad R's Adam, with the configured optimizer's groups and settings (its lr, weight decay, and Adam's
        betas, eps and kernel choice; ``check_run`` makes sure the configured optimizer is Adam), each group split
        into the prunable weights (rewired) and the rest (plain Adam)."""
        assert isinstance(config, GradRewiringConfig)
        configured = default(model)
        targets = {id(p) for p in prunable_parameters(model, config.targets).values()}
        groups = []
        for group in configured.param_groups:
            settings = dict(lr=group["lr"], betas=tuple(group.get("betas", (0.9, 0.999))), eps=group.get("eps", 1e-8),
                            weight_decay=group.get("weight_decay", 0.0))
            for rewire in (True, False):
                chosen = [p for p in group["params"] if (id(p) in targets) == rewire]
                if chosen:
                    groups.append({"params": chosen, "rewire": rewire, **settings})
        options = configured.defaults
        return GradRewiringAdam(groups, lr=options["lr"], penalty=config.penalty,
                                target_sparsity=config.target_sparsity, foreach=options.get("foreach"),
                                fused=options.get("fused"), compile=config.compile)

    # ------------------------------------------------------------ loop points
    def setup(self) -> None:
        """Every connection with a non-zero initial weight starts alive."""
        self._follow_weights()
        self.rewiring.start(self.masks.items())

    def before_step(self, step: int) -> None:
        """No gradient masking: a pruned connection keeps its gradient, which is how it grows back."""

    def after_step(self, step: int) -> None:
        self._follow_weights()

    def end_epoch(self, epoch: int) -> None:
        self.masks.verify()
        self.rewiring.end_epoch(self.masks.items())

    def _follow_weights(self) -> None:
        """Masks := (w != 0); the optimizer already wrote the weights, so nothing moves, and Adam's state is kept."""
        with torch.no_grad():
            changed = {}
            for name, param in self.params.items():
                alive = param.detach() != 0
                if not torch.equal(alive, self.masks[name]):
                    changed[name] = alive
        if changed:
            self.masks.update(changed, check=False)      # ranks are compared at each epoch's end

    # ------------------------------------------------------------ reporting and state
    def metrics(self) -> dict[str, float]:
        return self.rewiring.metrics(self.model, self.params)

    def state_dict(self) -> dict[str, Any]:
        return {"rewiring": self.rewiring.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rewiring" not in state:
            raise ValueError(f"the checkpoint has no rewiring state for {self.name}; resume with the same method")
        self.rewiring.load_state_dict(state["rewiring"], dict(self.masks.items()))

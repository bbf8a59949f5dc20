"""Deep R and soft Deep R: one update by hand, the noise, invariants over many steps, digits runs and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from engine.backends import Backend, DistEnv
from engine.checkpoint import load_state
from engine.optim import OptimConfig, build_optimizer
from engine.run_config import load_config
from engine.trainer import train
from pruning.methods import MethodContext, build_method
from pruning.methods.deep_r import DeepRConfig, SoftDeepRConfig
from pruning.selection import keep_top_k, seeded_uniform
from pruning.targets import TargetConfig

INIT = [0.5, -0.3, 0.2, -0.1, 0.4, -0.2]         # signs + - + - + -


def deep_r(values: list[float], active: list[bool], *, soft: bool = False, lr: float = 0.1, **cfg: float):
    """A one-row layer whose signs come from ``values``, with the given mask and weights, and a momentum SGD."""
    layer = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    config = (SoftDeepRConfig if soft else DeepRConfig)(method="soft_deep_r" if soft else "deep_r",
                                                        targets=TargetConfig(), **cfg)
    method = build_method(config, layer, optimizer, MethodContext(seed=3, steps_per_epoch=100, epochs=1))
    method.setup()
    method.masks.update({"weight": torch.tensor([active])})
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]) * torch.tensor([active]))
    if soft:
        method.theta["weight"] = torch.where(torch.tensor([active]), layer.weight.detach().abs(),
                                             torch.full((1, len(values)), -0.01))
    optimizer.state[layer.weight]["momentum_buffer"] = torch.ones(1, len(values))
    return layer, optimizer, method


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="^density"):
        DeepRConfig(density=0.0)
    with pytest.raises(ValueError, match="^grow_magnitude"):
        DeepRConfig(grow_magnitude=0.0)
    with pytest.raises(ValueError, match="^temperature"):
        DeepRConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="^l1 must be positive for soft_deep_r"):
        SoftDeepRConfig(l1=0.0)
    DeepRConfig(l1=0.0)     # hard Deep R runs without a prior


# ------------------------------------------------------------------ Deep R by hand
def test_deep_r_sign_flip_death_and_regrowth_by_hand() -> None:
    # active 0, 1, 2; the optimizer step flipped weight 2 (+0.2 -> -0.05). T = 0, l1 = 0.1, lr = 0.1: theta -= 0.01.
    layer, optimizer, method = deep_r(INIT, [True, True, True, False, False, False], temperature=0.0, l1=0.1,
                                      grow_magnitude=1e-6)
    with torch.no_grad():
        layer.weight[0, 2] = -0.05
    method.after_step(0)
    alive = torch.tensor([[True, True, False, False, False, False]])
    scores = seeded_uniform(layer.weight, 3, 0, "deepr/grow/weight").masked_fill(alive, -math.inf)
    grown = keep_top_k(scores, 1)
    assert int(grown.sum()) == 1 and not bool((grown & alive).any())
    mask = method.masks["weight"]
    assert mask.tolist() == (alive | grown).tolist() and int(mask.sum()) == 3
    g = int(grown.reshape(-1).nonzero())
    expected = [0.49, -0.29, 0.0, 0.0, 0.0, 0.0]
    expected[g] = math.copysign(1e-6, INIT[g])        # the stored sign, a small magnitude: alive
    assert layer.weight[0].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-12)
    momentum = optimizer.state[layer.weight]["momentum_buffer"][0].tolist()
    assert momentum[2] == 0.0 and momentum[g] == 0.0 and momentum[0] == momentum[1] == 1.0
    assert method.died["weight"] == 1 and method.grown["weight"] == 1


def test_regrown_connections_survive_the_next_step() -> None:
    # A regrown weight is s * grow_magnitude, not 0: with no gradient, noise or prior it stays alive and signed.
    layer, _, method = deep_r(INIT, [True, True, True, False, False, False], temperature=0.0, l1=0.0)
    with torch.no_grad():
        layer.weight[0, 0] = -0.5                      # flipped: dies, one regrows
    method.after_step(0)
    grown = method.masks["weight"] & ~torch.tensor([[True, True, True, False, False, False]])
    value = layer.weight[grown].item()
    assert value != 0.0 and math.copysign(1.0, value) == math.copysign(1.0, INIT[int(grown.reshape(-1).nonzero())])
    before = method.masks["weight"].clone()
    method.after_step(1)
    assert torch.equal(method.masks["weight"], before) and layer.weight[grown].item() == value


def test_zero_counts_as_dead() -> None:
    layer, _, method = deep_r(INIT, [True, True, True, False, False, False], temperature=0.0, l1=0.0)
    with torch.no_grad():
        layer.weight[0, 1] = 0.0                       # theta = 0: not > 0
    method.after_step(0)
    assert not bool(method.masks["weight"][0, 1]) and int(method.masks["weight"].sum()) == 3


def test_noise_has_the_langevin_scale_and_is_seeded() -> None:
    # theta moves by sqrt(2 lr T) N(0, 1): measured over 20,000 active connections that never die.
    n = 20_000
    values = [1.0] * n
    _, _, method = deep_r(values, [True] * (n // 2) + [False] * (n // 2), temperature=0.02, l1=0.0, lr=0.5)
    theta = torch.ones(1, n)
    a = method.theta_step(4, "weight", theta, method.masks["weight"], 0.5) - theta
    b = method.theta_step(4, "weight", theta, method.masks["weight"], 0.5) - theta
    c = method.theta_step(5, "weight", theta, method.masks["weight"], 0.5) - theta
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(math.sqrt(2 * 0.5 * 0.02), rel=0.03)
    assert abs(a.mean().item()) < 0.01


# ------------------------------------------------------------------ soft Deep R by hand
def test_soft_deep_r_theta_min_deaths_revivals_and_clamp() -> None:
    # theta_min = -T (1 - d) / (l1 d) = -1e-4 * 0.8 / (1e-2 * 0.2) = -0.04
    layer, _, method = deep_r(INIT, [True, True, True, False, False, False], soft=True, density=0.2,
                              temperature=1e-4, l1=1e-2, lr=1.0)
    assert method.theta_min == pytest.approx(-0.04)
    method.config.temperature = 0.0          # deterministic from here: prior only (theta_min stays -0.04)
    with torch.no_grad():
        layer.weight[0, 2] = 0.005           # theta 0.005 - lr * l1 = -0.005: dies, theta kept
    method.theta["weight"][0, 3] = 0.3       # a dormant walk that crossed zero: comes back as s * theta
    method.theta["weight"][0, 4] = -1.0      # below the clip: clamped
    method.after_step(0)
    assert method.masks["weight"].tolist() == [[True, True, False, True, False, False]]
    assert layer.weight[0].tolist() == pytest.approx([0.49, -0.29, 0.0, -0.3, 0.0, 0.0])
    theta = method.theta["weight"][0].tolist()
    assert theta[2] == pytest.approx(-0.005) and theta[4] == pytest.approx(-0.04)
    assert theta[5] == pytest.approx(-0.01)  # dormant: no prior, no noise


def test_soft_deep_r_never_empties_a_layer() -> None:
    layer, _, method = deep_r(INIT, [True, False, False, False, False, False], soft=True, temperature=0.0,
                              l1=1.0, lr=1.0)
    method.after_step(0)                     # theta 0.5 - 1 < 0: the last connection would die
    assert int(method.masks["weight"].sum()) == 1 and layer.weight[method.masks["weight"]].item() != 0.0


# ------------------------------------------------------------------ invariants over many steps
@pytest.mark.parametrize("name", ["deep_r", "soft_deep_r"])
def test_invariants_over_many_steps(name: str) -> None:
    torch.manual_seed(0)
    model = models.build_model("conv", in_channels=1, image_size=8, num_classes=4)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4))
    cls = SoftDeepRConfig if name == "soft_deep_r" else DeepRConfig
    config = cls(method=name, density=0.2, distribution="erk", temperature=1e-6, l1=1e-4, targets=TargetConfig())
    method = build_method(config, model, optimizer, MethodContext(seed=5, steps_per_epoch=80, epochs=1))
    method.setup()
    backend = Backend(DistEnv(), torch.device("cpu"))
    backend.wrap(model)
    inputs, targets = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    per_layer = {n: int(m.sum()) for n, m in method.masks.items()}
    for step in range(80):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        backend.backward(loss)
        before = {n: m.clone() for n, m in method.masks.items()}
        backend.step(optimizer, lambda: method.before_step(step), clip_grad_norm=None)
        method.after_step(step)
        for n, param in method.params.items():
            mask = method.masks[n]
            assert mask.any(), f"{n} emptied at step {step}"
            assert (param[~mask] == 0).all(), f"{n} has a non-zero pruned weight after step {step}"
            assert (method.signs[n][mask] * param[mask] > 0).all(), f"{n}: an active weight lost its sign"
            changed = mask ^ before[n]
            for value in optimizer.state[param].values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert (value[~mask] == 0).all() and (value[changed] == 0).all(), f"{n}: stale state"
            if name == "deep_r":
                assert int(mask.sum()) == per_layer[n], f"{n}: deep_r changed a layer's count"
            else:
                assert (method.theta[n] >= method.theta_min).all()
    assert method.total_died > 0


# ------------------------------------------------------------------ end to end on digits
DIGITS = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[128,64]",
          "optim.lr=0.1", "monitor.progress=false", "monitor.tensorboard=false", "checkpoint.save_final=false",
          "sparsity.density=0.1"]


@pytest.mark.parametrize("name", ["deep_r", "soft_deep_r"])
def test_digits_at_90_percent_sparsity(name: str, tmp_path: Path) -> None:
    summary = train(load_config(None, [*DIGITS, f"sparsity.method={name}", "train.epochs=15",
                                       "checkpoint.every_epochs=100", f"output_dir={tmp_path}", f"name={name}"]))
    if name == "deep_r":
        assert summary["density"] == pytest.approx(0.1, abs=1e-4)
    assert summary["test_acc"] > 0.9, f"{name} reached only {summary['test_acc']:.3f}"


@pytest.mark.parametrize("name", ["deep_r", "soft_deep_r"])
def test_resume_is_exact(name: str, tmp_path: Path) -> None:
    base = [*DIGITS, f"sparsity.method={name}", "train.epochs=3", "checkpoint.every_epochs=1",
            f"output_dir={tmp_path}", f"name={name}"]
    train(load_config(None, base))
    ckpts = sorted((tmp_path / name / "checkpoints").glob("ckpt-*.pt"))
    straight = load_state(str(ckpts[-1]))
    train(load_config(None, [*base, f"resume={ckpts[1]}"]))
    again = load_state(str(sorted((tmp_path / name / "checkpoints").glob("ckpt-*.pt"))[-1]))
    assert straight["method"]["total_died"] == again["method"]["total_died"] > 0
    for key, mask in straight["masks"].items():
        assert torch.equal(mask, again["masks"][key]), key
        assert torch.equal(straight["model"][key], again["model"][key]), key


def test_no_rewiring_from_stop_epoch_on() -> None:
    # steps_per_epoch 100, stop_epoch 1: step 99 (the last of epoch 0) rewires, step 100 does not
    layer, _, method = deep_r(INIT, [True, True, True, False, False, False], temperature=0.0, l1=0.0, stop_epoch=1)
    with torch.no_grad():
        layer.weight[0, 0] = -0.5
    before = method.masks["weight"].clone()
    method.after_step(100)
    assert torch.equal(method.masks["weight"], before) and layer.weight[0, 0].item() == -0.5
    method.after_step(99)
    assert not bool(method.masks["weight"][0, 0])


def test_deepspeed_with_half_precision_is_refused_before_any_worker() -> None:
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="^sparsity.method deep_r moves weights by about 1e-6 per step, below bf16"):
        load_config(None, ["sparsity.method=deep_r", "parallel.backend=deepspeed", "parallel.zero_stage=2",
                           "train.precision=bf16"])

"""Gradient Rewiring and the spiking style of Deep R: steps by hand, regrowth, sign-flip deaths, revivals that
survive, norm layers dense and trained, config checks, and a digits run that reports the spiking metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from engine.config import ConfigError
from engine.losses import build_loss
from engine.run_config import load_config
from engine.trainer import train
from pruning.methods import MethodContext, build_method, method_class
from pruning.methods.deep_r import DeepRConfig, SoftDeepRConfig
from pruning.methods.grad_rewiring import GradRewiringAdam, GradRewiringConfig
from pruning.selection import seeded_uniform
from pruning.targets import TargetConfig


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def reference_grad_r(w0: list[float], grads: list[list[float]], lr: float, alpha: float, s_target: float,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> list[dict[str, list[float]]]:
    """ALGORITHMS.md section 5 written out on Python floats, one element at a time: the state after each step."""
    b1, b2 = betas
    mu = math.log(2 * (1 - s_target)) / alpha
    sign = [-1.0 if w < 0 else 1.0 for w in w0]
    theta = [abs(w) for w in w0]
    m = [0.0] * len(w0)
    v = [0.0] * len(w0)
    out = []
    for t, g in enumerate(grads, start=1):
        for i in range(len(w0)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            adam_step = lr * m_hat / (math.sqrt(v_hat) + eps)
            prior_step = alpha * lr / (1 - b1**t) * math.copysign(1.0, theta[i] - mu) * (theta[i] != mu)
            theta[i] = sign[i] * (sign[i] * theta[i] - adam_step) - prior_step
        out.append({"theta": list(theta), "w": [s * max(th, 0.0) for s, th in zip(sign, theta)], "m": list(m),
                    "v": list(v)})
    return out


def grad_r_layer(w0: list[float], *, lr: float, alpha: float, s_target: float, fused: bool = False,
                 norm: bool = False) -> tuple[nn.Module, GradRewiringAdam, object]:
    layer = nn.Linear(len(w0), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([w0]))
    model = nn.Sequential(layer, nn.BatchNorm1d(1)) if norm else nn.Sequential(layer)
    config = GradRewiringConfig(method="grad_rewiring", penalty=alpha, target_sparsity=s_target)
    optimizer = method_class("grad_rewiring").make_optimizer(
        config, model, lambda m: torch.optim.Adam(m.parameters(), lr=lr, fused=fused, foreach=not fused))
    method = build_method(config, model, optimizer, MethodContext(steps_per_epoch=100, epochs=1))
    method.setup()
    return model, optimizer, method


def set_grads(model: nn.Module, g: list[float]) -> None:
    model[0].weight.grad = torch.tensor([g])


# ------------------------------------------------------------------ Grad R by hand
@pytest.mark.parametrize("fused", [False, True])
def test_grad_r_steps_by_hand(fused: bool) -> None:
    # s_target 0.5 puts mu at 0: the prior pulls theta up again once it is below zero (step 2, element 2)
    w0 = [0.5, -0.3, 0.02, -0.01]
    grads = [[0.2, -0.1, 0.4, 0.3], [0.0, 0.0, -5.0, 0.0], [0.1, 0.1, -5.0, -0.2]]
    model, optimizer, method = grad_r_layer(w0, lr=0.1, alpha=0.01, s_target=0.5, fused=fused)
    expected = reference_grad_r(w0, grads, lr=0.1, alpha=0.01, s_target=0.5)
    weight = model[0].weight
    for step, (g, want) in enumerate(zip(grads, expected)):
        set_grads(model, g)
        method.before_step(step)
        assert weight.grad[0].tolist() == pytest.approx(g)          # no masking: pruned weights keep their gradient
        optimizer.step()
        method.after_step(step)
        state = optimizer.state[weight]
        assert optimizer.theta(weight)[0].tolist() == pytest.approx(want["theta"], abs=1e-6)
        assert weight[0].tolist() == pytest.approx(want["w"], abs=1e-6)
        assert state["exp_avg"][0].tolist() == pytest.approx(want["m"], rel=1e-6)
        assert state["exp_avg_sq"][0].tolist() == pytest.approx(want["v"], rel=1e-6)
        assert method.masks["0.weight"][0].tolist() == [w != 0 for w in want["w"]]
        if step == 0:   # by hand: prior 0.01 * 0.1 / 0.1 = 0.01 on every theta, Adam step 0.1 * sign(g)
            assert weight[0].tolist() == pytest.approx([0.39, -0.19, 0.0, -0.1], abs=1e-6)
            assert optimizer.theta(weight)[0, 2].item() == pytest.approx(-0.09, abs=1e-6)
    assert weight[0, 2].item() > 0 and bool(method.masks["0.weight"][0, 2])   # pruned at step 1, back at step 3
    assert optimizer.state[weight]["sign"][0].tolist() == [1.0, -1.0, 1.0, -1.0]


def test_the_compiled_step_is_the_same_maths() -> None:
    w0 = [0.5, -0.3, 0.02, -0.01]
    grads = [[0.2, -0.1, 0.4, 0.3], [0.0, 0.0, -5.0, 0.0], [0.1, 0.1, -5.0, -0.2]]
    expected = reference_grad_r(w0, grads, lr=0.1, alpha=0.01, s_target=0.5)
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([w0]))
    model = nn.Sequential(layer, nn.BatchNorm1d(1))
    config = GradRewiringConfig(method="grad_rewiring", penalty=0.01, target_sparsity=0.5, compile=True)
    optimizer = method_class("grad_rewiring").make_optimizer(config, model,
                                                              lambda m: torch.optim.Adam(m.parameters(), lr=0.1))
    twin = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in model[1].parameters()], lr=0.1)
    for g, want in zip(grads, expected):
        set_grads(model, g)
        for p, q in zip(model[1].parameters(), twin.param_groups[0]["params"]):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        optimizer.step()
        twin.step()
        assert optimizer.theta(layer.weight)[0].tolist() == pytest.approx(want["theta"], abs=1e-6)
        assert layer.weight[0].tolist() == pytest.approx(want["w"], abs=1e-6)
        assert optimizer.state[layer.weight]["exp_avg_sq"][0].tolist() == pytest.approx(want["v"], rel=1e-6)
    assert int(optimizer.state[layer.weight]["step"]) == 3
    for p, q in zip(model[1].parameters(), twin.param_groups[0]["params"]):     # norm layers: plain Adam
        assert torch.allclose(p, q)


def test_the_prior_sees_theta_before_the_adam_step() -> None:
    # theta 0.05 > mu = 0, and the Adam step (0.1) would take it below: the prior still pushes down (sign at 0.05)
    model, optimizer, _ = grad_r_layer([0.05], lr=0.1, alpha=0.01, s_target=0.5)
    set_grads(model, [1.0])
    optimizer.step()
    assert optimizer.theta(model[0].weight).item() == pytest.approx(0.05 - 0.1 - 0.01, abs=1e-6)


def test_a_pruned_connection_grows_back_when_its_gradient_pushes_it() -> None:
    model, optimizer, method = grad_r_layer([0.02, 0.5], lr=0.01, alpha=1e-3, s_target=0.9)
    weight = model[0].weight
    for step in range(4):                       # pushed down: dies
        set_grads(model, [1.0, 0.0])
        optimizer.step()
        method.after_step(step)
    assert weight[0, 0].item() == 0.0 and not bool(method.masks["0.weight"][0, 0])
    method.end_epoch(0)
    assert method.metrics()["rewiring/pruned"] == 1 and method.metrics()["rewiring/regrown"] == 0
    for step in range(4, 20):                   # pushed up: the gradient keeps reaching it, it comes back
        set_grads(model, [-1.0, 0.0])
        method.before_step(step)
        optimizer.step()
        method.after_step(step)
    assert weight[0, 0].item() > 0 and bool(method.masks["0.weight"][0, 0])
    method.end_epoch(1)
    metrics = method.metrics()
    assert metrics["rewiring/regrown"] == 1 and metrics["rewiring/regrown/0.weight"] == 1
    assert metrics["connectivity"] == 1.0 and metrics["rewiring/pruned"] == 0


def test_norm_layers_are_plain_adam_and_never_pruned() -> None:
    torch.manual_seed(0)
    model, optimizer, method = grad_r_layer([0.3, -0.2], lr=0.05, alpha=0.5, s_target=0.9, norm=True)
    bn = model[1]
    twin = nn.BatchNorm1d(1)
    twin.load_state_dict(bn.state_dict())
    adam = torch.optim.Adam(twin.parameters(), lr=0.05, foreach=True)
    assert set(method.params) == {"0.weight"}
    for step in range(5):
        bn.weight.grad, bn.bias.grad = torch.tensor([0.3 - step]), torch.tensor([1.0])
        twin.weight.grad, twin.bias.grad = bn.weight.grad.clone(), bn.bias.grad.clone()
        set_grads(model, [1.0, 1.0])
        optimizer.step()
        adam.step()
        method.after_step(step)
    assert torch.equal(bn.weight, twin.weight) and torch.equal(bn.bias, twin.bias)
    assert bn.weight.item() != 1.0 and bn.bias.item() != 0.0


def test_grad_r_trains_a_spiking_conv_net_with_dense_trained_norms() -> None:
    torch.manual_seed(0)
    model = models.build_model("spiking_conv", in_channels=1, image_size=8, num_classes=4, width=6, hidden=16, vote=2)
    norms = {name: p.detach().clone() for name, p in model.named_parameters() if ".bn" in name}
    config = GradRewiringConfig(method="grad_rewiring", penalty=0.5, target_sparsity=0.9)
    optimizer = method_class("grad_rewiring").make_optimizer(config, model,
                                                              lambda m: torch.optim.Adam(m.parameters(), lr=0.01))
    method = build_method(config, model, optimizer, MethodContext())
    method.setup()
    assert all(".bn" not in name for name in method.params) and len(method.params) == 8
    loss = build_loss("rate_mse")
    x, y = torch.randn(8, 1, 8, 8) * 2, torch.arange(8) % 4
    for step in range(6):
        optimizer.zero_grad()
        loss(model(x), y).backward()
        method.before_step(step)
        optimizer.step()
        method.after_step(step)
        for name, mask in method.masks.items():
            assert (method.params[name][~mask] == 0).all()
    for name, param in model.named_parameters():
        if name in norms:
            assert not torch.equal(param.detach(), norms[name]) and bool((param != 0).all() or "bias" in name), name
    assert method.metrics()["connectivity"] < 1.0 and method.metrics()["connectivity_all"] > method.metrics()[
        "connectivity"]


def test_grad_r_config_checks() -> None:
    with pytest.raises(ValueError, match="^penalty must be >= 0"):
        GradRewiringConfig(penalty=-1.0)
    with pytest.raises(ValueError, match=r"^target_sparsity must be in \[0.5, 1\)"):
        GradRewiringConfig(target_sparsity=0.4)
    base = ["sparsity.method=grad_rewiring", "model.name=spiking_mlp", "train.loss=rate_mse"]
    with pytest.raises(ConfigError, match="^sparsity.method grad_rewiring is Adam with a sparsity prior, not sgd"):
        load_config(None, base)
    load_config(None, [*base, "optim.name=adam", "parallel.backend=deepspeed", "parallel.zero_stage=0"])
    with pytest.raises(ConfigError, match="^sparsity.method grad_rewiring runs under DeepSpeed only at "
                                          "parallel.zero_stage=0"):
        load_config(None, [*base, "optim.name=adam", "parallel.backend=deepspeed", "parallel.zero_stage=1"])


# ------------------------------------------------------------------ Deep R, style spiking
INIT = [0.5, -0.3, 0.2, -0.1, 0.4, -0.2]


def spiking_deep_r(values: list[float], *, soft: bool = False, lr: float = 0.1, **cfg: object):
    layer = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    kind = SoftDeepRConfig if soft else DeepRConfig
    config = kind(method="soft_deep_r" if soft else "deep_r", targets=TargetConfig(), style="spiking", **cfg)
    method = build_method(config, layer, optimizer, MethodContext(seed=3, steps_per_epoch=100, epochs=1))
    method.setup()
    return layer, optimizer, method


def test_spiking_style_defaults_and_checks() -> None:
    assert (DeepRConfig(style="spiking").temperature, DeepRConfig(style="spiking").grow_magnitude) == (0.0, 1e-8)
    assert (DeepRConfig().temperature, DeepRConfig().grow_magnitude) == (1e-10, 1e-12)
    with pytest.raises(ConfigError, match="^sparsity.style spiking takes Adam's step size"):
        load_config(None, ["sparsity.method=deep_r", "sparsity.style=spiking"])
    load_config(None, ["sparsity.method=deep_r", "sparsity.style=spiking", "optim.name=adam"])


def test_spiking_deep_r_starts_dense_and_kills_sign_flips_with_adam_step_sizes() -> None:
    layer, _, method = spiking_deep_r(INIT, density=0.1, l1=0.01)
    assert bool(method.masks["weight"].all())
    with torch.no_grad():
        layer.weight[0, 2] = -0.05          # the optimizer step flipped it: it dies
    method.after_step(4)                    # t = 5: lr_t = 0.1 / (1 - 0.9^5)
    lr_t = 0.1 / (1 - 0.9**5)
    expected = [w - math.copysign(0.01 * lr_t, w) for w in INIT]
    expected[2] = 0.0
    assert layer.weight[0].tolist() == pytest.approx(expected, abs=1e-7)
    assert method.masks["weight"][0].tolist() == [True, True, False, True, True, True]   # 1/6 dormant < max_s 0.9
    assert method.died["weight"] == 1 and method.grown["weight"] == 0


def test_spiking_deep_r_revives_with_the_stored_sign_and_revived_connections_survive() -> None:
    layer, optimizer, method = spiking_deep_r(INIT, density=0.6, l1=0.0, grow_magnitude=1e-3)
    with torch.no_grad():
        layer.weight[0, 1:5] = torch.tensor([0.3, -0.2, 0.1, -0.4])   # four sign flips: dormant fraction 4/6 > 0.4
    method.after_step(0)
    dormant = torch.tensor([[False, True, True, True, True, False]])
    draw = seeded_uniform(dormant, 3, 0, "deepr/revive/weight")
    fraction = 4 / 6
    revived = dormant & (draw < (fraction - 0.4) / fraction)
    assert 0 < int(revived.sum()) < 4
    assert torch.equal(method.masks["weight"], ~dormant | revived)
    signs = torch.tensor([INIT]).sign()
    assert torch.equal(layer.weight[revived], (signs * 1e-3)[revived])      # the stored sign, not +eps
    assert any(INIT[i] < 0 for i in revived.reshape(-1).nonzero().reshape(-1).tolist())
    assert method.died["weight"] == 4 - int(revived.sum())      # died and revived in one step: no mask change
    before = method.masks["weight"].clone()
    optimizer.zero_grad()
    layer.weight.grad = torch.zeros_like(layer.weight)
    method.before_step(1)
    optimizer.step()
    method.after_step(1)                    # no gradient, no prior, no noise: every revived one is still alive
    assert bool(method.masks["weight"][revived].all()) and torch.equal(method.masks["weight"] & before, before)
    assert torch.equal(layer.weight[revived].sign(), signs[revived])


def test_soft_spiking_deep_r_starts_dense_with_theta_at_the_weights() -> None:
    layer, _, method = spiking_deep_r(INIT, soft=True, density=0.2, temperature=1e-4, l1=1e-2)
    assert bool(method.masks["weight"].all())
    assert method.theta["weight"][0].tolist() == pytest.approx([abs(w) for w in INIT])
    assert method.theta_min == pytest.approx(-1e-4 * 0.8 / (1e-2 * 0.2))


def test_spiking_deep_r_keeps_norm_layers_dense_and_trained() -> None:
    torch.manual_seed(0)
    model = models.build_model("spiking_conv", in_channels=1, image_size=8, num_classes=4, width=6, hidden=16, vote=2)
    norms = {name: p.detach().clone() for name, p in model.named_parameters() if ".bn" in name}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    config = DeepRConfig(method="deep_r", style="spiking", density=0.5, l1=1e-2)
    method = build_method(config, model, optimizer, MethodContext())
    method.setup()
    loss = build_loss("rate_mse")
    x, y = torch.randn(8, 1, 8, 8) * 2, torch.arange(8) % 4
    for step in range(4):
        optimizer.zero_grad()
        loss(model(x), y).backward()
        method.before_step(step)
        optimizer.step()
        method.after_step(step)
    assert all(".bn" not in name for name in method.params)
    for name, param in model.named_parameters():
        if name in norms:
            assert not torch.equal(param.detach(), norms[name]), name


# ------------------------------------------------------------------ a run, end to end
def test_digits_run_reports_spiking_metrics_to_summary_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train(load_config("configs/spiking/digits_grad_r.yaml", [
        f"output_dir={tmp_path}", "name=run", "model.options.hidden=48", "train.epochs=2",
        "train.max_steps_per_epoch=6", "monitor.progress=false", "sparsity.penalty=0.5"]))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("spikes/firing_rate/lif1", "spikes/firing_rate/lif2", "spikes/silent/lif1"):
        assert 0.0 <= on_disk[key] <= 1.0 and summary[key] == on_disk[key]
    method = on_disk["method_metrics"]
    assert method["connectivity"] == pytest.approx(on_disk["density"]) and method["connectivity"] < 1.0
    assert method["connectivity_all"] == pytest.approx(method["connectivity"])     # no norm layers in this net
    assert method["rewiring/pruned"] > 0 and "rewiring/regrown" in method
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"test/spikes/firing_rate/lif1", "method/connectivity", "method/connectivity_all",
            "method/rewiring/regrown"} <= tags
    assert len(events.Scalars("test/spikes/firing_rate/lif2")) == 2

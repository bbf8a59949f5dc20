"""Spiking models (models/spiking.py) and the rate-MSE loss: shapes sized by the data, the neuron model, states reset
by the model after every pass, multi-step = single-step, the output as spike counts over T, firing-rate probes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from engine.losses import build_loss

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def small_conv(step_mode: str = "m", **options: object) -> nn.Module:
    torch.manual_seed(0)
    return models.build_model("spiking_conv", in_channels=3, image_size=8, num_classes=4, width=6, hidden=16,
                              vote=3, step_mode=step_mode, **options)


def spiking_modules(model: nn.Module) -> list[nn.Module]:
    from spikingjelly.activation_based.neuron import BaseNode

    return [m for m in model.modules() if isinstance(m, BaseNode)]


def test_models_are_sized_by_the_data() -> None:
    mnist = models.build_model("spiking_mlp", in_channels=1, image_size=28, num_classes=10)
    assert [tuple(p.shape) for p in mnist.parameters()] == [(800, 784), (10, 800)]
    cifar = models.build_model("spiking_conv", in_channels=3, image_size=32, num_classes=10)
    shapes = {name: tuple(p.shape) for name, p in cifar.named_parameters()}
    assert shapes["static.conv1.weight"] == (256, 3, 3, 3) and shapes["dynamic.conv6.weight"] == (256, 256, 3, 3)
    assert shapes["dynamic.fc7.weight"] == (2048, 16384) and shapes["dynamic.fc8.weight"] == (100, 2048)
    assert sum(name.endswith("conv") or ".conv" in name for name in shapes) == 6
    assert sum(".bn" in name for name in shapes) == 12                          # six BNs, weight and bias each
    assert all(not name.endswith("bias") or ".bn" in name for name in shapes)   # no biases but the BNs'
    digits = models.build_model("spiking_conv", in_channels=1, image_size=8, num_classes=10, width=8, hidden=32)
    assert tuple(digits.dynamic.fc7.weight.shape) == (32, 8 * 2 * 2)
    assert digits(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    synthetic = models.build_model("spiking_mlp", in_channels=3, image_size=16, num_classes=7, hidden=20)
    assert synthetic(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert mnist.static.fc1.sparsity_role == "stem" and mnist.dynamic.fc2.sparsity_role == "classifier"


def test_bad_options_fail_in_one_line() -> None:
    with pytest.raises(ValueError, match="^model spiking_mlp: option tau must be > 1"):
        models.build_model("spiking_mlp", in_channels=1, image_size=8, num_classes=10, tau=1.0)
    with pytest.raises(ValueError, match="step_mode must be one of 'm', 's'"):
        models.check_model_options("spiking_conv", {"step_mode": "multi"})
    with pytest.raises(ValueError, match="at least 4 px"):
        models.build_model("spiking_conv", in_channels=1, image_size=3, num_classes=10)


def test_neurons_are_the_papers_lif() -> None:
    from spikingjelly.activation_based import surrogate

    neurons = spiking_modules(small_conv())
    assert len(neurons) == 8
    for lif in neurons:
        assert (lif.tau, lif.v_threshold, lif.v_reset, lif.detach_reset) == (2.0, 1.0, 0.0, True)
        assert isinstance(lif.surrogate_function, surrogate.ATan)


@pytest.mark.parametrize("mode", ["m", "s"])
def test_states_are_reset_after_every_pass(mode: str) -> None:
    model = small_conv(mode)
    x = torch.randn(4, 3, 8, 8) * 3
    model.train()
    model(x).sum().backward()
    assert all(isinstance(lif.v, float) and lif.v == 0.0 for lif in spiking_modules(model))
    assert model.dynamic.dropout.mask is None
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)           # nothing carried from one pass to the next
    assert all(lif.v == 0.0 for lif in spiking_modules(model))


def test_output_is_the_spike_count_over_t() -> None:
    model = small_conv(time_steps=5)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(16, 3, 8, 8) * 4)
    counts = out * 5 * 3                        # T = 5, groups of 3 outputs voted into a class
    assert torch.equal(counts, counts.round()) and bool((out >= 0).all() and (out <= 1).all())
    mlp = models.build_model("spiking_mlp", in_channels=1, image_size=8, num_classes=10, hidden=32)
    with torch.no_grad():
        for lin in (mlp.static.fc1, mlp.dynamic.fc2):
            lin.weight.mul_(8)
        rates = mlp(torch.randn(8, 1, 8, 8))
    assert torch.equal(rates * 8, (rates * 8).round()) and bool(rates.sum() > 0)


def test_multi_step_and_single_step_compute_the_same_net() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 1, 8, 8)
    nets = {}
    for mode in "ms":
        torch.manual_seed(0)
        net = models.build_model("spiking_mlp", in_channels=1, image_size=8, num_classes=10, hidden=40,
                                 step_mode=mode)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(6)
        out = net(x)
        out.sum().backward()
        nets[mode] = (out.detach(), [p.grad.clone() for p in net.parameters()])
    assert nets["m"][0].sum() > 0 and torch.allclose(nets["m"][0], nets["s"][0])
    for a, b in zip(nets["m"][1], nets["s"][1]):
        assert torch.allclose(a, b, atol=1e-6)
    conv = {mode: small_conv(mode).eval() for mode in "ms"}      # eval: the BNs use the same running statistics
    with torch.no_grad():
        x = torch.randn(4, 3, 8, 8) * 3
        assert torch.equal(conv["m"](x), conv["s"](x))


@pytest.mark.parametrize("mode", ["m", "s"])
def test_firing_rate_probes(mode: str) -> None:
    model = small_conv(mode).eval()
    x = torch.randn(5, 3, 8, 8) * 3
    sums: dict[str, torch.Tensor] = {}
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, probe in model.evaluation_probes().items():
        def hook(module: nn.Module, inputs: object, output: torch.Tensor, name: str = name, probe=probe) -> None:
            sums[name] = sums.get(name, 0) + probe(output)
            seen.setdefault(name, []).append(output.detach().clone())
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(x)
        model(x)
    for handle in handles:
        handle.remove()
    metrics = model.evaluation_metrics(sums)
    assert set(metrics) == {f"spikes/{kind}/lif{i}" for kind in ("firing_rate", "silent") for i in range(1, 9)}
    for name, outputs in seen.items():
        spikes = torch.cat([o.reshape(-1) for o in outputs])
        layer = name.removeprefix("dynamic.")
        assert metrics[f"spikes/firing_rate/{layer}"] == pytest.approx(float(spikes.mean()))
        per_neuron = sum(o.reshape(-1, *(o.shape[2:] if mode == "m" else o.shape[1:])).sum(0) for o in outputs)
        assert metrics[f"spikes/silent/{layer}"] == pytest.approx(float((per_neuron == 0).double().mean()))


def test_rate_mse_by_hand() -> None:
    loss = build_loss("rate_mse")
    rates = torch.tensor([[0.5, 0.0, 0.25], [0.0, 1.0, 0.0]])
    # sample 0, label 0: (0.25 + 0 + 0.0625) / 3; sample 1, label 2: (0 + 1 + 1) / 3; mean of the two
    expected = ((0.25 + 0.0625) / 3 + 2.0 / 3) / 2
    assert float(loss(rates, torch.tensor([0, 2]))) == pytest.approx(expected)
    smoothed = build_loss("rate_mse", 0.3)      # label 0.8 / 0.1 / 0.1
    assert float(smoothed(torch.tensor([[0.8, 0.1, 0.1]]), torch.tensor([0]))) == pytest.approx(0.0, abs=1e-12)


def test_spikingjelly_is_imported_only_when_a_spiking_model_is_built() -> None:
    code = ("import sys, models, engine.run_config, launcher.cli; assert 'spikingjelly' not in sys.modules; "
            "models.build_model('spiking_mlp', in_channels=1, image_size=8, num_classes=10, hidden=4); "
            "assert 'spikingjelly' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_spiking_configs_follow_the_published_recipes() -> None:
    from engine.run_config import load_config

    configs = {path.stem: load_config(str(path)) for path in (REPO / "configs" / "spiking").glob("*.yaml")}
    assert {f"{data}_{method}" for data in ("mnist", "cifar10") for method in
            ("grad_r", "deep_r", "soft_deep_r", "no_prune")} <= set(configs)
    for name, cfg in configs.items():
        assert cfg.train.loss == "rate_mse" and cfg.optim.name == "adam" and cfg.optim.weight_decay == 0.0, name
        assert cfg.lr_schedule.name == "constant" and cfg.model.name.startswith("spiking_"), name
        method = cfg.sparsity.method
        if name.startswith("mnist"):
            assert (cfg.data.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.model.name) == (128, 512, 1e-3,
                                                                                             "spiking_mlp")
        if name.startswith("cifar10"):
            assert (cfg.data.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.model.name) == (16, 2048, 1e-4,
                                                                                             "spiking_conv")
            assert cfg.data.augment == "standard"
        if name.startswith(("mnist", "cifar10")):
            if method == "grad_rewiring":
                assert cfg.sparsity.penalty == 1e-3
            elif method in ("deep_r", "soft_deep_r"):
                assert (cfg.sparsity.l1, cfg.sparsity.style, cfg.sparsity.temperature) == (1e-3, "spiking", 0.0)
            else:
                assert method == "dense"

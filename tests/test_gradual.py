"""Gradual, union-mask and unit pruning: hand-computed prunes on tiny tensors, invariants, end-to-end on digits."""

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
from pruning.methods.gradual import GradualConfig
from pruning.methods.union_mask import UnionMaskConfig
from pruning.methods.unit import UnitConfig
from pruning.schedules import ExponentialConfig, LinearConfig, OneShotInitConfig
from pruning.selection import keep_top_k_per_row
from pruning.targets import TargetConfig


class TwoLinear(nn.Module):
    """fc1 2x4 and fc2 3x2 with hand-set weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 2, bias=False)
        self.fc2 = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, -4.0, 3.0, 2.0], [0.5, 6.0, -7.0, 8.0]]))
            self.fc2.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.125, 0.2]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def one_shot(scope: str) -> dict[str, list[list[bool]]]:
    method = build_method(GradualConfig(method="gradual", schedule=OneShotInitConfig(final_sparsity=0.5),
                                        scope=scope), TwoLinear(), None, MethodContext(steps_per_epoch=4))
    method.setup()
    return {name: mask.tolist() for name, mask in method.masks.items()}


def test_keep_top_k_per_row_ties_to_lowest_index() -> None:
    scores = torch.tensor([[0.5, 0.2, 0.5, 0.9], [1.0, 1.0, 1.0, -math.inf]])
    keep = keep_top_k_per_row(scores, torch.tensor([2, 3]))
    assert keep.tolist() == [[True, False, False, True], [True, True, True, False]]
    assert keep_top_k_per_row(scores, 0).sum() == 0
    with pytest.raises(ValueError, match="cannot keep"):
        keep_top_k_per_row(scores, 5)


def test_one_gradual_prune_per_unit() -> None:
    # every row keeps round(0.5 * fan_in): fc1 rows keep 2 of 4, fc2 rows 1 of 2.
    masks = one_shot("unit")
    assert masks["fc1.weight"] == [[False, True, True, False], [False, False, True, True]]
    assert masks["fc2.weight"] == [[False, True], [True, False], [False, True]]


def test_one_gradual_prune_per_layer() -> None:
    # fc1 keeps 4 of 8 (8, 7, 6, 4); fc2 keeps 3 of 6 (3, 2, and the first of the two 1s by index).
    masks = one_shot("layer")
    assert masks["fc1.weight"] == [[False, True, False, False], [False, True, True, True]]
    assert masks["fc2.weight"] == [[True, True], [True, False], [False, False]]


def test_one_gradual_prune_global() -> None:
    # 7 of 14 with one threshold: 8, 7, 6, 4, 3 (fc1), 3 (fc2), and the first 2 by position (fc1's).
    masks = one_shot("global")
    assert masks["fc1.weight"] == [[False, True, True, True], [False, True, True, True]]
    assert masks["fc2.weight"] == [[False, False], [True, False], [False, False]]


def row_method(carry: bool) -> tuple[nn.Linear, object, torch.optim.Optimizer]:
    """One 1x4 layer on a linear ramp 0 -> 0.5 over steps 0..2, pruning every step."""
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    cfg = GradualConfig(method="gradual", scope="layer", carry_mask=carry,
                        schedule=LinearConfig(final_sparsity=0.5, start=0, end=2, prune_freq=1))
    method = build_method(cfg, layer, optimizer, MethodContext(steps_per_epoch=2))
    method.setup()
    method.after_step(0)                                   # t = 1: sparsity 0.25 keeps 3 of 4, drops the 1.0
    assert method.masks["weight"].tolist() == [[False, True, True, True]]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.5, 0.25, 4.0]]))   # training moved the kept weights
    optimizer.state[layer.weight]["momentum_buffer"] = torch.ones(1, 4)
    method.after_step(1)                                   # t = 2 = end: sparsity 0.5 keeps 2
    return layer, method, optimizer


def test_carry_mask_on_keeps_pruned_weights_pruned() -> None:
    layer, method, _ = row_method(carry=True)
    assert method.masks["weight"].tolist() == [[False, True, False, True]]     # scores -inf, .5, .25, 4
    assert layer.weight.tolist() == [[0.0, 0.5, 0.0, 4.0]]


def test_carry_mask_off_brings_back_the_stored_value() -> None:
    layer, method, optimizer = row_method(carry=False)
    assert method.masks["weight"].tolist() == [[True, False, False, True]]     # stored 1.0 beats .5 and .25
    assert layer.weight.tolist() == [[1.0, 0.0, 0.0, 4.0]]                    # back with its value at pruning
    # fresh optimizer state where weights came back (and, by the MaskSet's rule, where they were dropped)
    assert optimizer.state[layer.weight]["momentum_buffer"].tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert method.stored["weight"][0, 1:3].tolist() == [0.5, 0.25]


def set_weight(layer: nn.Linear, values: list[float]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))


def test_union_mask_cycles_by_hand() -> None:
    # s_f 0.5, cycles [0, 2], [2, 4], last cycle [4, 6]; prune every step; one 1x4 layer, layer scope.
    layer = nn.Linear(4, 1, bias=False)
    set_weight(layer, [4.0, 3.0, 2.0, 1.0])
    cfg = UnionMaskConfig(method="union_mask", density=0.5, start=0, end=6, cycles=3, prune_freq=1,
                          scope="layer")
    method = build_method(cfg, layer, None, MethodContext(steps_per_epoch=6))
    method.setup()

    def mask() -> list[bool]:
        return method.masks["weight"].tolist()[0]

    method.after_step(0)                     # t=1: 0.5 sin(pi/4) = 0.354 keeps round(2.59) = 3: drops the 1.0
    assert mask() == [True, True, True, False]
    set_weight(layer, [4.0, 0.5, 2.0, 0.0])
    method.after_step(1)                     # t=2, cycle end: 0.5 keeps 2 (stored 1.0 beats 0.5), U = mask, reset
    assert method.union["weight"].tolist()[0] == [True, False, True, False]
    assert mask() == [True, True, True, True]
    assert layer.weight.tolist()[0] == [4.0, 0.5, 2.0, 1.0]                    # back with stored values
    set_weight(layer, [0.125, 0.5, 2.0, 1.0])
    method.after_step(2)                     # t=3: keeps 3, drops 0.125
    assert mask() == [False, True, True, True]
    set_weight(layer, [0.0, 0.5, 2.0, 3.0])
    method.after_step(3)                     # t=4 = end - C: keeps 2, OR into U, mask = U
    assert method.union["weight"].tolist()[0] == [True, False, True, True]
    assert mask() == [True, False, True, True]
    assert layer.weight.tolist()[0] == [0.125, 0.0, 2.0, 3.0]
    assert method.union_sparsity == 0.25     # the last ramp starts from U's largest per-layer sparsity
    set_weight(layer, [0.125, 0.0, 2.0, 3.0])
    method.after_step(4)                     # t=5: 0.375 keeps 2, carry on: stored 0.5 may not come back
    assert mask() == [False, False, True, True]
    method.after_step(5)                     # t=6 = end: exactly 0.5
    assert mask() == [False, False, True, True] and method.target == 0.5


def test_union_mask_config_checks() -> None:
    with pytest.raises(ValueError, match="^density"):
        UnionMaskConfig(density=0.0)
    with pytest.raises(ValueError, match="^cycles must be at least 2"):
        UnionMaskConfig(cycles=1)
    with pytest.raises(ValueError, match="^end 2.0 is a float"):
        UnionMaskConfig(end=2.0)
    assert UnionMaskConfig().targets.exclude_roles == ["shortcut", "classifier"]
    layer = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="do not fit"):
        build_method(UnionMaskConfig(method="union_mask", end=10, cycles=11), layer, None,
                     MethodContext(steps_per_epoch=10))


def test_union_mask_cycles_round_to_whole_steps() -> None:
    # 10 steps in 3 cycles: boundaries 0, 3, 7, 10 (rounded); the ramp reaches s_f on each cycle's last step.
    method = build_method(UnionMaskConfig(method="union_mask", density=0.4, end=10, cycles=3, prune_freq=2),
                          nn.Linear(4, 1), None, MethodContext(steps_per_epoch=10))
    cycles = method.cycles
    assert cycles.bounds == [0, 3, 7, 10] and cycles.last_start == 7
    assert [t for t in range(11) if cycles.is_prune_step(t)] == [0, 2, 3, 5, 7]
    assert cycles.sparsity(2) == pytest.approx(0.6 * math.sin(math.pi / 2 * 2 / 3))
    assert cycles.sparsity(5) == pytest.approx(0.6 * math.sin(math.pi / 2 * 2 / 4))
    assert cycles.sparsity(3) == cycles.sparsity(7) == pytest.approx(0.6)


def test_union_mask_cycle_length_as_written() -> None:
    """cycle = C (ALGORITHMS.md's form): boundaries every C steps; C that does not tile the window is refused."""
    context = MethodContext(steps_per_epoch=20)
    by_length = build_method(UnionMaskConfig(method="union_mask", end=12, cycle=4), nn.Linear(4, 1), None, context)
    by_count = build_method(UnionMaskConfig(method="union_mask", end=12, cycles=3), nn.Linear(4, 1), None, context)
    assert by_length.cycles.bounds == by_count.cycles.bounds == [0, 4, 8, 12]
    as_fraction = build_method(UnionMaskConfig(method="union_mask", end=0.6, cycle=0.2), nn.Linear(4, 1), None,
                               context)
    assert as_fraction.cycles.bounds == [0, 4, 8, 12]
    with pytest.raises(ValueError, match="^cycle: end - start \\(12 steps\\) must hold a whole number"):
        build_method(UnionMaskConfig(method="union_mask", end=12, cycle=5), nn.Linear(4, 1), None, context)
    with pytest.raises(ValueError, match="^cycles and cycle both set"):
        UnionMaskConfig(cycle=4, cycles=3)


class ConvFc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 3.0, 2.0, 0.5]).reshape(4, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.5, 2.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("scope,conv,fc", [
    ("layer", [False, True, True, False], [True, False, True]),     # conv keeps 2 of 4, fc round(1.5) = 2 of 3
    ("global", [False, True, True, False], [True, False, True]),    # round(3.5) = 4 of 7 units: 4, 3, 2.5, 2
])
def test_unit_pruning_by_hand(scope: str, conv: list[bool], fc: list[bool]) -> None:
    # unit L2 norms: conv filters 1, 3, 2, 0.5; fc rows 2.5, 0.2, 4.
    model = ConvFc()
    method = build_method(UnitConfig(method="unit", scope=scope, schedule=OneShotInitConfig(final_sparsity=0.5)),
                          model, None, MethodContext(steps_per_epoch=1))
    method.setup()
    conv_mask, fc_mask = method.masks["conv.weight"], method.masks["fc.weight"]
    assert conv_mask.reshape(4, -1).all(1).tolist() == conv and fc_mask.all(1).tolist() == fc
    assert conv_mask.reshape(4, -1).any(1).tolist() == conv and fc_mask.any(1).tolist() == fc   # whole units
    assert (model.fc.weight[1] == 0).all() and model.conv.weight[0].item() == 0.0


# ------------------------------------------------------------------ invariants over many steps
CASES = [
    ("gradual", dict(scope="unit", carry_mask=True)),
    ("gradual", dict(scope="layer", carry_mask=False)),
    ("gradual", dict(scope="global", carry_mask=True)),
    ("unit", dict(scope="layer", carry_mask=True)),
    ("union_mask", dict(scope="unit")),
    ("union_mask", dict(scope="global", carry_mask=True)),
]


def build_case(method: str, options: dict, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int):
    if method == "union_mask":
        cfg = UnionMaskConfig(method=method, density=0.1, start=4, end=steps - 12, cycles=4, prune_freq=3,
                              targets=TargetConfig(), **options)
    else:
        schedule = (ExponentialConfig(final_sparsity=0.9, start=0.1, end=0.8, prune_freq=5) if method == "unit" else
                    LinearConfig(final_sparsity=0.9, start=5, end=steps - 5, prune_freq=4))
        config_cls = UnitConfig if method == "unit" else GradualConfig
        cfg = config_cls(method=method, schedule=schedule, **options)
    return build_method(cfg, model, optimizer, MethodContext(steps_per_epoch=steps))


@pytest.mark.parametrize("method,options", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={x}" for k, x in v.items()))
def test_invariants_over_many_steps(method: str, options: dict) -> None:
    torch.manual_seed(0)
    steps = 64
    model = models.build_model("conv", in_channels=1, image_size=8, num_classes=4)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4))
    sparsity = build_case(method, options, model, optimizer, steps)
    sparsity.setup()
    backend = Backend(DistEnv(), torch.device("cpu"))
    backend.wrap(model)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    previous = {name: mask.clone() for name, mask in sparsity.masks.items()}
    carry = options.get("carry_mask", False)
    end = sparsity.cycles.end if method == "union_mask" else sparsity.schedule.end
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        backend.backward(loss)
        backend.step(optimizer, lambda: sparsity.before_step(step), clip_grad_norm=None)
        sparsity.after_step(step)
        t = step + 1
        for name, param in sparsity.params.items():
            mask = sparsity.masks[name]
            assert (param[~mask] == 0).all(), f"{name} has a non-zero pruned weight at t={t}"
            # carry_mask: masks only shrink; union mask: always in its last cycle, never across its resets
            shrink_only = t > sparsity.cycles.last_start if method == "union_mask" else carry
            if shrink_only:
                assert not (mask & ~previous[name]).any(), f"{name} regrew under carry_mask at t={t}"
            previous[name] = mask.clone()
        if t == end:
            assert sparsity.masks.density() == pytest.approx(0.1, abs=0.02)
            assert sparsity.target == 0.9
    assert sparsity.target == 0.9


# ------------------------------------------------------------------ end to end on digits
SMALL = ["data.name=digits", "data.batch_size=64", "model.name=conv", "model.options.width=8", "optim.lr=0.05",
         "monitor.progress=false", "monitor.tensorboard=false", "train.max_steps_per_epoch=6", "train.epochs=3",
         "checkpoint.keep=5"]
GRADUAL = ["sparsity.method=gradual", "sparsity.schedule.name=cubic", "sparsity.schedule.final_sparsity=0.8",
           "sparsity.schedule.start=2", "sparsity.schedule.end=1.0", "sparsity.schedule.prune_freq=4"]
UNION = ["sparsity.method=union_mask", "sparsity.density=0.2", "sparsity.start=0", "sparsity.end=18",
         "sparsity.cycles=3", "sparsity.prune_freq=2", "sparsity.targets.exclude_roles=[classifier]"]


def test_gradual_end_to_end(tmp_path: Path) -> None:
    summary = train(load_config(None, [*SMALL, *GRADUAL, f"output_dir={tmp_path}", "name=gradual"]))
    assert summary["steps"] == 18
    kept = sum(layer["kept"] for layer in summary["layers"].values())
    numel = sum(layer["numel"] for layer in summary["layers"].values())
    assert all(layer["nonzero"] <= layer["kept"] for layer in summary["layers"].values())
    assert kept / numel == pytest.approx(0.2, abs=0.02) and summary["density"] == kept / numel


def test_union_mask_end_to_end_and_exact_resume(tmp_path: Path) -> None:
    base = [*SMALL, *UNION, f"output_dir={tmp_path}", "name=union"]
    summary = train(load_config(None, base))
    assert summary["steps"] == 18 and summary["density"] == pytest.approx(0.2, abs=0.02)
    ckpts = sorted((tmp_path / "union" / "checkpoints").glob("ckpt-*.pt"))
    assert len(ckpts) == 3
    straight = load_state(str(ckpts[2]))
    train(load_config(None, [*base, f"resume={ckpts[1]}"]))   # epochs 3 again, from the epoch-2 checkpoint
    again = load_state(str(sorted((tmp_path / "union" / "checkpoints").glob("ckpt-*.pt"))[-1]))
    for name, mask in straight["masks"].items():
        assert torch.equal(mask, again["masks"][name]), name
        assert torch.equal(straight["method"]["union"][name], again["method"]["union"][name]), name
        assert torch.equal(straight["model"][name], again["model"][name]), name
    assert straight["method"]["union_sparsity"] == again["method"]["union_sparsity"]

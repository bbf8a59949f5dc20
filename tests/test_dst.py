"""SET, RigL and DSR: hand-computed updates on tiny tensors, invariants over many updates, digits runs, two ranks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
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
from pruning.agreement import seeded_generator
from pruning.methods import MethodContext, build_method
from pruning.methods.dsr import DSRConfig, dsr_shares
from pruning.methods.dst import RigLConfig, SETConfig
from pruning.selection import keep_top_k, layer_densities
from pruning.targets import TargetConfig

REPO = Path(__file__).resolve().parents[1]


def row(values: list[float]) -> nn.Linear:
    layer = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    return layer


def with_mask(method: object, masks: dict[str, list[bool]]) -> None:
    """setup(), then the given masks over the original weights (setup's random mask zeroed some of them)."""
    values = {name: p.detach().clone() for name, p in method.params.items()}
    method.setup()
    method.masks.update({name: torch.tensor([m]) for name, m in masks.items()})
    with torch.no_grad():
        for name, p in method.params.items():
            p.copy_(torch.where(method.masks[name], values[name], torch.zeros_like(p)))


ROW = [0.5, -3.0, 0.125, 2.0, -0.25, 0.0, 0.0, 0.0]
ACTIVE = [True, True, True, True, True, False, False, False]


# ------------------------------------------------------------------ config
def test_config_checks() -> None:
    with pytest.raises(ValueError, match="^period_epochs has 2 entries and periods 1"):
        SETConfig(period_epochs=[0, 5], periods=[100])
    with pytest.raises(ValueError, match="^period_epochs must be non-negative and strictly increasing"):
        SETConfig(period_epochs=[0, 5, 5], periods=[1, 2, 3])
    with pytest.raises(ValueError, match="^periods must all be at least 1"):
        SETConfig(period_epochs=[0], periods=[0])
    with pytest.raises(ValueError, match="^drop_fraction"):
        SETConfig(drop_fraction=1.0)
    with pytest.raises(ValueError, match="^density"):
        RigLConfig(density=1.0)
    with pytest.raises(ValueError, match="^target_pruned"):
        DSRConfig(target_pruned=0)
    with pytest.raises(ValueError, match="^threshold_init"):
        DSRConfig(threshold_init=0.0)
    assert DSRConfig().targets.exclude_roles == ["stem", "shortcut", "classifier"]
    assert RigLConfig().drop_decay == "cosine" and SETConfig().drop_decay == "constant"


def test_period_schedule_and_stop_epoch() -> None:
    cfg = DSRConfig(method="dsr", period=7, period_epochs=[1, 3], periods=[2, 4], stop_epoch=5,
                    targets=TargetConfig())
    method = build_method(cfg, row(ROW), None, MethodContext(steps_per_epoch=8, epochs=10))
    assert [method.periods.period_at(e) for e in range(6)] == [7, 2, 2, 4, 4, 4]
    due = [s for s in range(80) if method.periods.is_due(s + 1)]
    # t = s + 1; epochs are 8 steps: 7 in epoch 0 | 10..24 by 2 in epochs 1-2 | 28..40 by 4 in 3-4 | none from 5 on
    assert due == [6, 9, 11, 13, 15, 17, 19, 21, 23, 27, 31, 35, 39]


# ------------------------------------------------------------------ one update by hand
def test_set_one_update_by_hand() -> None:
    # 5 active, f 0.3: drop int(1.5) + 1 = 2 smallest |w| (0.125 at 2, -0.25 at 4); grow 2 among {2, 4, 5, 6, 7}
    layer = row(ROW)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    method = build_method(SETConfig(method="set", density=0.5, period=1), layer, optimizer,
                          MethodContext(seed=7, steps_per_epoch=10))
    with_mask(method, {"weight": ACTIVE})
    optimizer.state[layer.weight]["momentum_buffer"] = torch.ones(1, 8)
    method.after_step(0)
    kept = torch.tensor([[True, True, False, True, False, False, False, False]])
    scores = torch.rand((1, 8), generator=seeded_generator(7, 0, "grow/weight")).masked_fill(kept, -math.inf)
    grown = keep_top_k(scores, 2)
    expected = kept | grown
    assert method.masks["weight"].tolist() == expected.tolist()
    assert int(method.masks["weight"].sum()) == 5
    momentum = optimizer.state[layer.weight]["momentum_buffer"]
    old = torch.tensor([ACTIVE])
    for i in range(8):
        was, now = bool(old[0, i]), bool(expected[0, i])
        value = ROW[i] if was and now else 0.0                   # dropped and regrown in one update: left alone
        assert layer.weight[0, i].item() == pytest.approx(value)
        assert momentum[0, i].item() == (1.0 if was == now else 0.0)
    change = method.last_changes["weight"]
    assert change.dropped == int((old & ~expected).sum()) and change.grown == int((expected & ~old).sum())
    assert method.metrics()["dst/dropped/weight"] == change.dropped


def test_rigl_one_update_by_hand() -> None:
    # drop as SET (0.125 at 2, -0.25 at 4); grow the 2 largest |grad| among {2, 4, 5, 6, 7}: 6 (-2.0) and 2 (0.75).
    layer = row(ROW)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    method = build_method(RigLConfig(method="rigl", density=0.5, period=1), layer, optimizer,
                          MethodContext(seed=7, steps_per_epoch=10))
    with_mask(method, {"weight": ACTIVE})
    assert method.drop_fraction.at(1) == pytest.approx(0.15 * (1 + math.cos(math.pi / 10)))   # T_end = 10 steps
    assert method.drop_fraction.at(5) == pytest.approx(0.15)
    optimizer.state[layer.weight]["momentum_buffer"] = torch.ones(1, 8)
    layer.weight.grad = torch.tensor([[9.0, 9.0, 0.75, 9.0, 0.0, 0.5, -2.0, 0.25]])
    method.before_step(0)
    assert layer.weight.grad.tolist() == [[9.0, 9.0, 0.75, 9.0, 0.0, 0.0, 0.0, 0.0]]   # masked after the copy
    method.after_step(0)
    assert method.masks["weight"].tolist() == [[True, True, True, True, False, False, True, False]]
    assert layer.weight.tolist() == [[0.5, -3.0, 0.125, 2.0, 0.0, 0.0, 0.0, 0.0]]        # 2 kept its value
    assert optimizer.state[layer.weight]["momentum_buffer"].tolist() == [[1, 1, 1, 1, 0, 1, 0, 1]]
    assert (method.last_changes["weight"].dropped, method.last_changes["weight"].grown) == (1, 1)
    assert method.dense_grads == {}


def test_rigl_skips_an_update_whose_gradients_overflowed() -> None:
    # fp16 loss scaling: the step's gradients hold inf, the scaler skips the optimizer step; RigL has no scores to
    # grow by, so it leaves the masks alone, counts the skip, and the next update runs as usual
    layer = row(ROW)
    method = build_method(RigLConfig(method="rigl", density=0.5, period=1), layer, None,
                          MethodContext(seed=7, steps_per_epoch=10))
    with_mask(method, {"weight": ACTIVE})
    before = method.masks["weight"].clone()
    layer.weight.grad = torch.tensor([[9.0, 9.0, 0.75, 9.0, 0.0, math.inf, -2.0, 0.25]])
    method.before_step(0)
    method.after_step(0)
    assert torch.equal(method.masks["weight"], before) and method.updates == 0 and method.skipped == 1
    assert method.drain_events() == [(1, {"dst/skipped_updates": 1.0})]
    layer.weight.grad = torch.tensor([[9.0, 9.0, 0.75, 9.0, 0.0, 0.5, -2.0, 0.25]])
    method.before_step(1)
    method.after_step(1)
    assert method.updates == 1 and not torch.equal(method.masks["weight"], before)


def test_set_reinit_gives_grown_weights_a_seeded_value() -> None:
    layer = row(ROW)
    method = build_method(SETConfig(method="set", density=0.5, period=1, grow_init="reinit"), layer, None,
                          MethodContext(seed=3, steps_per_epoch=10))
    with_mask(method, {"weight": ACTIVE})
    old = method.masks["weight"].clone()
    method.after_step(0)
    grown = method.masks["weight"] & ~old
    assert grown.any()
    values = layer.weight.detach()[grown]
    assert (values != 0).all() and (values.abs() <= 1 / math.sqrt(8)).all()
    expected = (torch.rand((1, 8), generator=seeded_generator(3, 0, "reinit/weight")) * 2 - 1) / math.sqrt(8)
    assert torch.equal(values, expected[grown])


def test_an_update_that_loses_weights_is_refused() -> None:
    method = build_method(SETConfig(method="set", density=0.5, period=1), row(ROW), None,
                          MethodContext(steps_per_epoch=10))
    with_mask(method, {"weight": ACTIVE})
    method.new_masks = lambda step, grads: {"weight": torch.tensor([[True] * 4 + [False] * 4])}
    with pytest.raises(RuntimeError, match="set changed the active count from 5 to 4"):
        method.after_step(0)


def test_rigl_refuses_a_missing_gradient() -> None:
    layer = row(ROW)
    method = build_method(RigLConfig(method="rigl", density=0.5, period=1), layer, None, MethodContext())
    method.setup()
    with pytest.raises(RuntimeError, match="no gradient for weight: dense gradients are read after backward"):
        method.before_step(0)


class TwoRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = row([0.1, -0.2, 0.3, 1.0, -0.05, 0.6, 0.0, 0.0])
        self.b = row([0.01, -0.02, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("target,threshold", [(10, 0.5), (5, 0.125), (6, 0.25)])
def test_dsr_one_update_by_hand(target: int, threshold: float) -> None:
    # H = 0.25. a: 0.1, -0.2, -0.05 go (R_a = 3, room 2); b: all four are under H, its largest (0.2) stays (R_b = 1,
    # room 4). K = 6: shares floor(6*3/4) = 4 and floor(6/4) = 1, remainder 1 to a random layer; a holds only 2, so
    # the rest spills to b: a regrows 2 (at 6, 7), b regrows 4 (at 4..7). K = 6 vs N_p: < 0.9 N_p doubles H,
    # > 1.1 N_p halves it, otherwise H stays.
    model = TwoRows()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = DSRConfig(method="dsr", density=0.5, period=1, period_epochs=[], periods=[], threshold_init=0.25,
                    target_pruned=target, targets=TargetConfig())
    method = build_method(cfg, model, optimizer, MethodContext(seed=1, steps_per_epoch=10))
    with_mask(method, {"a.weight": [True] * 6 + [False] * 2, "b.weight": [True] * 4 + [False] * 4})
    method.after_step(0)
    assert method.masks["a.weight"].tolist() == [[False, False, True, True, False, True, True, True]]
    assert method.masks["b.weight"].tolist() == [[False, False, False, True, True, True, True, True]]
    assert model.a.weight.tolist() == [[0.0, 0.0, pytest.approx(0.3), 1.0, 0.0, pytest.approx(0.6), 0.0, 0.0]]
    assert model.b.weight.tolist() == [[0.0, 0.0, 0.0, pytest.approx(0.2), 0.0, 0.0, 0.0, 0.0]]
    assert method.last_pruned == 6 and method.threshold == threshold
    metrics = method.metrics()
    assert metrics["dsr/reallocated/a.weight"] == -1 and metrics["dsr/reallocated/b.weight"] == 1
    assert metrics["dsr/threshold"] == threshold


def test_dsr_shares_remainder_and_spill() -> None:
    generator = seeded_generator(0, 0, "test")
    counts = dsr_shares(10, [1, 1, 1], [10, 10, 10], generator)
    assert sum(counts) == 10 and sorted(counts) == [3, 3, 4]
    assert dsr_shares(10, [8, 1, 1], [2, 10, 10], generator) == [2, 4, 4]    # 8 capped at 2, 6 split 3/3 + 1 each
    assert dsr_shares(7, [5, 1], [3, 4], generator) == [3, 4]
    with pytest.raises(ValueError, match="cannot regrow 8"):
        dsr_shares(8, [5, 1], [3, 4], generator)


def test_dsr_drops_only_what_fits_when_the_network_is_full() -> None:
    # 7 of 8 active, all under H: keep the largest, 6 want to go, but only 1 inactive position can take a regrowth.
    layer = row([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.0])
    cfg = DSRConfig(method="dsr", density=0.5, period=1, period_epochs=[], periods=[], threshold_init=1.0,
                    targets=TargetConfig())
    method = build_method(cfg, layer, None, MethodContext(steps_per_epoch=10))
    with_mask(method, {"weight": [True] * 7 + [False]})
    method.after_step(0)
    assert method.masks["weight"].tolist() == [[False, True, True, True, True, True, True, True]]
    assert method.last_pruned == 1


def test_dsr_kernel_granularity_by_hand() -> None:
    # Conv 2 -> 2, kernel 1 x 2: four slices. Means |w|: (0,0) 0.6, (0,1) 0.03, (1,0) 1.5; (1,1) inactive.
    # H = 0.1 drops slice (0,1); its one slice regrows in the only other free slice, (1,1); K = 1 < 0.9 N_p: H doubles.
    conv = nn.Conv2d(2, 2, kernel_size=(1, 2), bias=False)
    weights = torch.tensor([[[[0.5, 0.7]], [[0.05, -0.01]]], [[[-2.0, 1.0]], [[0.3, 0.3]]]])
    with torch.no_grad():
        conv.weight.copy_(weights)
    cfg = DSRConfig(method="dsr", density=0.75, period=1, period_epochs=[], periods=[], threshold_init=0.1,
                    target_pruned=5, granularity="kernel", targets=TargetConfig())
    method = build_method(cfg, conv, None, MethodContext(seed=1, steps_per_epoch=10))
    method.setup()
    assert method.active_count() == 3 and method.masks["weight"].reshape(4, 2).sum(1).tolist() in (
        [2, 2, 2, 0], [2, 2, 0, 2], [2, 0, 2, 2], [0, 2, 2, 2])                  # whole slices, exactly 3 of 4
    start = torch.tensor([True, True, True, False]).reshape(2, 2, 1, 1).expand(2, 2, 1, 2)
    method.masks.update({"weight": start})
    with torch.no_grad():
        conv.weight.copy_(weights * start)
    method.after_step(0)
    expected = torch.tensor([True, False, True, True]).reshape(2, 2, 1, 1).expand(2, 2, 1, 2)
    assert method.masks["weight"].tolist() == expected.tolist()
    assert torch.equal(conv.weight.detach(), weights * (expected & start))     # grown slice (1,1) starts at 0
    assert method.last_pruned == 1 and method.threshold == 0.2 and method.active_count() == 3


def test_dsr_kernel_granularity_invariants() -> None:
    torch.manual_seed(0)
    model = models.build_model("conv", in_channels=1, image_size=8, num_classes=4)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9))
    cfg = DSRConfig(method="dsr", density=0.3, distribution="erk", period=2, period_epochs=[], periods=[],
                    target_pruned=10, granularity="kernel", targets=TargetConfig())
    method = build_method(cfg, model, optimizer, MethodContext(seed=5, steps_per_epoch=40, epochs=1))
    method.setup()
    backend = Backend(DistEnv(), torch.device("cpu"))
    backend.wrap(model)
    inputs, targets = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    slices = method.active_count()
    moved = 0
    for step in range(40):
        backend.backward(nn.functional.cross_entropy(model(inputs), targets))
        backend.step(optimizer, lambda: method.before_step(step), clip_grad_norm=None)
        method.after_step(step)
        assert method.active_count() == slices
        for n, param in method.params.items():
            mask = method.masks[n]
            rows = mask.reshape(method.scope.units(n)[0], -1)
            assert (rows.all(1) | ~rows.any(1)).all(), f"{n}: a kernel slice is partly masked"
            assert mask.any() and (param[~mask] == 0).all()
        moved += sum(c.grown for c in method.last_changes.values())
    assert method.updates == 20 and moved > 0 and any(p.dim() == 4 for p in method.params.values())


def test_dsr_kernel_granularity_starts_each_layer_at_its_erk_density() -> None:
    model = models.build_model("conv", in_channels=1, image_size=8, num_classes=4)
    cfg = DSRConfig(method="dsr", density=0.1, distribution="erk", granularity="kernel", targets=TargetConfig())
    method = build_method(cfg, model, None, MethodContext(seed=2, steps_per_epoch=10))
    method.setup()
    wanted = layer_densities({n: p.shape for n, p in method.params.items()}, 0.1, "erk")
    for name in method.params:
        units = method.scope.units(name)[0]
        assert abs(float(method.unit_mask(name).float().mean()) - wanted[name]) <= 1.0 / units, name
    assert abs(method.masks.density() - 0.1) < 0.01
    weight_masks = {n: keep_top_k(torch.rand(p.shape), p.numel() // 2) for n, p in method.params.items()}
    with pytest.raises(ValueError, match="not made of whole kernel slices"):
        method.masks.load_state_dict(weight_masks)      # the trainer restores the masks first
        method.load_state_dict({"threshold": 1e-3})


# ------------------------------------------------------------------ invariants over many updates
def dst_config(name: str) -> object:
    common = dict(density=0.2, distribution="erk", period=3, targets=TargetConfig())
    if name == "set":
        return SETConfig(method="set", **common)
    if name == "rigl":
        return RigLConfig(method="rigl", **common)
    return DSRConfig(method="dsr", period_epochs=[], periods=[], target_pruned=30, **common)


@pytest.mark.parametrize("name", ["set", "rigl", "dsr"])
def test_invariants_over_many_updates(name: str) -> None:
    torch.manual_seed(0)
    model = models.build_model("conv", in_channels=1, image_size=8, num_classes=4)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4))
    method = build_method(dst_config(name), model, optimizer, MethodContext(seed=5, steps_per_epoch=60, epochs=1))
    method.setup()
    backend = Backend(DistEnv(), torch.device("cpu"))
    backend.wrap(model)
    inputs, targets = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    total = sum(int(m.sum()) for _, m in method.masks.items())
    per_layer = {n: int(m.sum()) for n, m in method.masks.items()}
    churn = 0
    for step in range(60):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        backend.backward(loss)
        before = {n: m.clone() for n, m in method.masks.items()}
        backend.step(optimizer, lambda: method.before_step(step), clip_grad_norm=None)
        method.after_step(step)
        assert sum(int(m.sum()) for _, m in method.masks.items()) == total
        for n, param in method.params.items():
            mask = method.masks[n]
            assert mask.any(), f"{n} emptied at step {step}"
            assert (param[~mask] == 0).all(), f"{n} has a non-zero pruned weight after step {step}"
            grown = mask & ~before[n]
            churn += int(grown.sum())
            assert (param[grown] == 0).all(), f"{n} grew a non-zero weight"
            for value in optimizer.state[param].values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert (value[~mask] == 0).all() and (value[grown] == 0).all(), f"{n}: stale optimizer state"
            if name != "dsr":
                assert int(mask.sum()) == per_layer[n], f"{n}: {name} moved weights between layers"
    assert method.updates == 20 and churn > 0


# ------------------------------------------------------------------ end to end on digits
DIGITS = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[128,64]",
          "optim.lr=0.1", "monitor.progress=false", "monitor.tensorboard=false", "train.epochs=20",
          "checkpoint.every_epochs=100", "checkpoint.save_final=false", "sparsity.density=0.1", "sparsity.period=10"]
DSR_DIGITS = ["sparsity.period_epochs=[]", "sparsity.periods=[]", "sparsity.target_pruned=200",
              "sparsity.targets.exclude_roles=[]"]


@pytest.mark.parametrize("name", ["set", "rigl", "dsr"])
def test_digits_at_90_percent_sparsity(name: str, tmp_path: Path) -> None:
    extra = DSR_DIGITS if name == "dsr" else []
    summary = train(load_config(None, [*DIGITS, *extra, f"sparsity.method={name}", f"output_dir={tmp_path}",
                                       f"name={name}"]))
    assert summary["steps"] == 460
    assert summary["density"] == pytest.approx(0.1, abs=1e-4)
    assert all(layer["nonzero"] <= layer["kept"] for layer in summary["layers"].values())
    assert summary["test_acc"] > 0.9, f"{name} reached only {summary['test_acc']:.3f}"


def test_dsr_resumes_with_its_threshold(tmp_path: Path) -> None:
    base = [*DIGITS, *DSR_DIGITS, "sparsity.method=dsr", "train.epochs=3", "checkpoint.every_epochs=1",
            f"output_dir={tmp_path}", "name=dsr"]
    train(load_config(None, base))
    ckpts = sorted((tmp_path / "dsr" / "checkpoints").glob("ckpt-*.pt"))
    straight = load_state(str(ckpts[-1]))
    train(load_config(None, [*base, f"resume={ckpts[1]}"]))
    again = load_state(str(sorted((tmp_path / "dsr" / "checkpoints").glob("ckpt-*.pt"))[-1]))
    assert straight["method"]["threshold"] == again["method"]["threshold"]
    assert straight["method"]["updates"] == again["method"]["updates"] > 0
    for name, mask in straight["masks"].items():
        assert torch.equal(mask, again["masks"][name]), name
        assert torch.equal(straight["model"][name], again["model"][name]), name


# ------------------------------------------------------------------ two ranks
@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tests/dst_probe.py under torchrun on 2 ranks, once with DDP and once with DeepSpeed ZeRO 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    out = {}
    for backend in ("ddp", "zero2"):
        out[backend] = tmp_path_factory.mktemp(f"dst-{backend}")
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", "tests/dst_probe.py", str(out[backend]), backend], cwd=REPO,
                                capture_output=True, text=True, timeout=420, env=env)
        (out[backend] / "probe.log").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, f"{backend}: {result.stderr[-3000:]}"
    return out


def probe_result(directory: Path, name: str) -> list[dict]:
    return [torch.load(directory / f"rank{r}-{name}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_two_ranks_agree_and_a_rank_local_choice_is_caught(backend: str, probes: dict[str, Path]) -> None:
    for name in ["set", "rigl", "dsr", "deep_r"]:
        ranks = probe_result(probes[backend], name)
        assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])   # each rank sees its own data
        assert ranks[0]["steps"] >= 200
        if name == "deep_r":
            assert ranks[0]["metrics"]["deepr/died_total"] >= 60     # rewired at many steps
        else:
            assert ranks[0]["metrics"]["dst/updates"] >= 60
        for key, tensor in ranks[0]["model"].items():   # under ZeRO: the gathered fp32 master weights
            assert torch.equal(tensor, ranks[1]["model"][key]), f"{name}: {key} differs across ranks"
        for key, mask in ranks[0]["masks"].items():
            assert torch.equal(mask, ranks[1]["masks"][key]), f"{name}: mask {key} differs across ranks"
            assert (ranks[0]["model"][key][~mask] == 0).all()
    for r in range(2):
        message = (probes[backend] / f"rank{r}-broken.txt").read_text()
        assert message.startswith("masks differ across ranks at layer features.0.weight"), message


@pytest.mark.parametrize("run", ["rigl_one", "rigl_one_zero1"])
def test_rigl_grows_where_ddp_grows_under_zero(run: str, probes: dict[str, Path]) -> None:
    # One RigL update after 3 steps: ZeRO's gathered dense gradient must pick the positions DDP's param.grad picks.
    ddp, zero = probe_result(probes["ddp"], "rigl_one")[0], probe_result(probes["zero2"], run)[0]
    assert ddp["metrics"]["dst/updates"] == zero["metrics"]["dst/updates"] == 1
    for key, mask in ddp["masks"].items():
        assert torch.equal(mask, zero["masks"][key]), key


def test_every_update_is_logged_to_tensorboard_at_its_step(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [*DIGITS, *DSR_DIGITS, "sparsity.method=dsr", "train.epochs=2", "monitor.tensorboard=true",
                 f"output_dir={tmp_path}", "name=dsr"]
    summary = train(load_config(None, overrides))
    events = EventAccumulator(str(tmp_path / "dsr" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    layers = [n for n in summary["layers"]]
    for tag in ["method/dsr/threshold", "method/dsr/pruned", *(f"method/dst/{kind}/{layer}" for layer in layers
                for kind in ("dropped", "grown", "density")), *(f"method/dsr/reallocated/{n}" for n in layers)]:
        assert tag in tags, tag
    steps = {e.step for e in events.Scalars("method/dsr/threshold")}
    updates = set(range(10, summary["steps"] + 1, 10))         # period 10: an event at t = 10, 20, ...
    epoch_ends = set(range(0, summary["steps"] + 1, summary["steps"] // 2))   # metrics() at every epoch log
    assert updates <= steps and steps - updates <= epoch_ends, sorted(steps)
    densities = [e.value for e in events.Scalars(f"method/dst/density/{layers[0]}")]
    assert all(0.0 < d < 1.0 for d in densities)

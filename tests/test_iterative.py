"""Iterative pruning from dense: hand-computed fractions and masks, prune times, invariants, config checks, and
end-to-end runs on digits with exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import models
from engine.backends import Backend, DistEnv
from engine.checkpoint import Checkpointer, load_state
from engine.config import ConfigError
from engine.optim import OptimConfig, build_optimizer
from engine.run_config import load_config
from engine.trainer import train
from pruning.methods import MethodContext, build_method
from pruning.methods.iterative import IterativeConfig, IterativePruning
from pruning.timing import density_after, per_prune_fraction


# ------------------------------------------------------------------ the maths by hand
def test_exponential_fractions_by_hand() -> None:
    # s = 0.875, n = 3: (1 - s)^(1/3) = 0.5, so every prune halves what is left: densities 1/2, 1/4, 1/8.
    for k in range(3):
        assert per_prune_fraction(k, 3, 0.875, "exponential") == pytest.approx(0.5, abs=1e-12)
    assert [density_after(k, 3, 0.875, "exponential") for k in range(3)] == pytest.approx([0.5, 0.25, 0.125])


def test_cubic_fractions_by_hand() -> None:
    # d_k = 1/8 + 7/8 (1 - k/3)^3: d_1 = 1/8 + 7/27 = 83/216, d_2 = 1/8 + 7/216 = 34/216, d_3 = 27/216 = 1/8.
    # f_0 = 1 - 83/216 = 133/216 = 0.615741, f_1 = 1 - 34/83 = 49/83 = 0.590361, f_2 = 1 - 27/34 = 7/34 = 0.205882.
    assert [density_after(k, 3, 0.875, "cubic") for k in range(3)] == pytest.approx([83 / 216, 34 / 216, 27 / 216])
    fractions = [per_prune_fraction(k, 3, 0.875, "cubic") for k in range(3)]
    assert fractions == pytest.approx([133 / 216, 49 / 83, 7 / 34], abs=1e-12)
    assert fractions == pytest.approx([0.615741, 0.590361, 0.205882], abs=1e-6)
    # the written-out formula of ALGORITHMS.md section 3, term by term
    s, n = 0.875, 3
    for k in range(n):
        formula = 1 - (1 - s + s * (1 - (k + 1) / n) ** 3) / (1 - s + s * (1 - k / n) ** 3)
        assert fractions[k] == pytest.approx(formula, abs=1e-12)


def test_density_edges() -> None:
    for kind in ("exponential", "cubic"):
        assert density_after(-1, 4, 0.9, kind) == 1.0
        assert density_after(3, 4, 0.9, kind) == 1.0 - 0.9          # exactly the float the exact check uses
        remaining = 1.0
        for k in range(4):
            remaining *= 1.0 - per_prune_fraction(k, 4, 0.9, kind)
        assert remaining == pytest.approx(0.1, abs=1e-12)
    assert per_prune_fraction(0, 1, 0.6, "cubic") == pytest.approx(0.6)   # n = 1: one prune straight to s
    with pytest.raises(ValueError, match="prune index"):
        density_after(4, 4, 0.9, "cubic")
    with pytest.raises(ValueError, match="prune index"):
        per_prune_fraction(-1, 4, 0.9, "cubic")
    with pytest.raises(ValueError, match="^fraction"):
        density_after(0, 4, 0.9, "linear")


# ------------------------------------------------------------------ driving the method by hand
class TwoLinear(nn.Module):
    """fc1 8x8 and fc2 4x8: 64 and 32 weights with distinct magnitudes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 4, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.linspace(0.01, 1.0, 64).reshape(8, 8).flip(1))
            self.fc2.weight.copy_(-torch.linspace(0.015, 0.9, 32).reshape(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def iterative(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, steps_per_epoch: int,
              epochs: int, **options: object) -> IterativePruning:
    method = build_method(IterativeConfig(method="iterative", **options), model, optimizer,
                          MethodContext(steps_per_epoch=steps_per_epoch, epochs=epochs))
    assert isinstance(method, IterativePruning)
    return method


def test_prunes_happen_exactly_at_their_times() -> None:
    # steps_per_epoch 5, start 2, every 3, 3 prunes: after 2, 5 and 8 epochs, i.e. t = 10, 25, 40.
    method = iterative(TwoLinear(), steps_per_epoch=5, epochs=9, density=0.125, prunes=3, every_epochs=3,
                       start_epoch=2, scope="layer")
    assert method.prunes.times == [10, 25, 40]
    method.setup()
    assert method.masks.density() == 1.0 and method.drain_events() == []
    changed, logged = [], []
    previous = {name: mask.clone() for name, mask in method.masks.items()}
    for step in range(45):
        method.after_step(step)
        if any(not torch.equal(previous[n], m) for n, m in method.masks.items()):
            changed.append(step + 1)
        previous = {name: mask.clone() for name, mask in method.masks.items()}
        logged += method.drain_events()
    assert changed == [10, 25, 40]
    assert [t for t, _ in logged] == [10, 25, 40]
    assert [e["iterative/prune"] for _, e in logged] == [1.0, 2.0, 3.0]
    assert [e["iterative/target_density"] for _, e in logged] == pytest.approx([83 / 216, 34 / 216, 1 / 8])
    # fc1 64 -> 25 -> 10 -> 8 and fc2 32 -> 12 -> 5 -> 4 (round(d * N) from d, not compounded)
    assert [e["iterative/layer_density/fc1.weight"] * 64 for _, e in logged] == [25, 10, 8]
    assert [e["iterative/layer_density/fc2.weight"] * 32 for _, e in logged] == [12, 5, 4]
    assert [e["iterative/fraction"] for _, e in logged] == pytest.approx([1 - 37 / 96, 1 - 15 / 37, 1 - 12 / 15])
    assert [e["iterative/fraction_target"] for _, e in logged] == pytest.approx([133 / 216, 49 / 83, 7 / 34])
    assert method.prunes_done == 3 and method.target == 0.875
    assert method.metrics()["iterative/target_density"] == 0.125
    assert method.layer_targets() == {"fc1.weight": 0.125, "fc2.weight": 0.125}


def test_start_epoch_zero_prunes_at_setup() -> None:
    method = iterative(TwoLinear(), steps_per_epoch=5, epochs=2, density=0.5, prunes=1, start_epoch=0)
    assert method.prunes.times == [0]
    method.setup()
    assert [int(m.sum()) for _, m in method.masks.items()] == [32, 16]
    assert [t for t, _ in method.drain_events()] == [0]


def test_smallest_magnitudes_go_first_by_hand() -> None:
    # one 1x8 layer, exponential s = 0.75 over 2 prunes: keep round(0.5 * 8) = 4, then round(0.25 * 8) = 2.
    layer = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-0.3, 5.0, 0.1, -2.0, 0.7, 3.0, -0.05, 1.0]]))
    method = iterative(layer, steps_per_epoch=1, epochs=3, density=0.25, prunes=2, fraction="exponential")
    method.setup()
    method.after_step(0)                                   # t = 1: keeps 5, 3, -2, 1 (|w| largest)
    assert method.masks["weight"].tolist() == [[False, True, False, True, False, True, False, True]]
    assert layer.weight.tolist() == [[0.0, 5.0, 0.0, -2.0, 0.0, 3.0, 0.0, 1.0]]
    with torch.no_grad():                                  # training moved the kept weights; a pruned one is forced
        layer.weight.copy_(torch.tensor([[9.0, 0.5, 0.0, -4.0, 0.0, 0.2, 0.0, 1.0]]))   # large: it must not return
    method.after_step(1)                                   # t = 2: among kept 0.5, -4, 0.2, 1 keeps -4 and 1
    assert method.masks["weight"].tolist() == [[False, False, False, True, False, False, False, True]]
    assert layer.weight.tolist() == [[0.0, 0.0, 0.0, -4.0, 0.0, 0.0, 0.0, 1.0]]   # every pruned weight zeroed


def test_global_scope_one_threshold_by_hand() -> None:
    # fc1 [[1, -4, 3, 2], [.5, 6, -7, 8]], fc2 [[1, 2], [3, -1], [.125, .2]]: 7 of 14 kept with one threshold:
    # 8, -7, 6, -4, 3 (fc1), 3 (fc2), then the first 2 by position (fc1's before fc2's).
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -4.0, 3.0, 2.0], [0.5, 6.0, -7.0, 8.0]]))
        model[1].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.125, 0.2]]))
    method = iterative(model, steps_per_epoch=1, epochs=2, density=0.5, prunes=1, scope="global")
    method.setup()
    method.after_step(0)
    assert method.masks["0.weight"].tolist() == [[False, True, True, True], [False, True, True, True]]
    assert method.masks["1.weight"].tolist() == [[False, False], [True, False], [False, False]]
    assert method.layer_targets() is None


# ------------------------------------------------------------------ invariants in a real loop
@pytest.mark.parametrize("scope,fraction", [("layer", "cubic"), ("global", "cubic"), ("layer", "exponential"),
                                            ("global", "exponential")])
def test_exact_counts_and_zeros_in_a_real_loop(scope: str, fraction: str) -> None:
    torch.manual_seed(0)
    spe, epochs, s, n = 4, 8, 0.9, 4
    model = models.build_model("conv", in_channels=1, image_size=8, num_classes=4)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4))
    method = iterative(model, optimizer, steps_per_epoch=spe, epochs=epochs, density=1 - s, prunes=n,
                       every_epochs=2, start_epoch=1, scope=scope, fraction=fraction)
    assert method.prunes.times == [4, 12, 20, 28]
    method.setup()
    backend = Backend(DistEnv(), torch.device("cpu"))
    backend.wrap(model)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    previous = {name: mask.clone() for name, mask in method.masks.items()}
    sizes = {name: m.numel() for name, m in method.masks.items()}
    for step in range(spe * epochs):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        backend.backward(loss)
        backend.step(optimizer, lambda: method.before_step(step), clip_grad_norm=None)
        weights = {name: p.detach().abs().clone() for name, p in method.params.items()}
        method.after_step(step)
        t = step + 1
        for name, param in method.params.items():
            mask = method.masks[name]
            assert not (mask & ~previous[name]).any(), f"{name} regrew at t={t}"
            assert (param[~mask] == 0).all(), f"{name} has a non-zero pruned weight at t={t}"
            momentum = optimizer.state[param]["momentum_buffer"]
            assert (momentum[~mask] == 0).all(), f"{name} has momentum on a pruned weight at t={t}"
        if t in method.prunes.times:
            d = density_after(method.prunes.times.index(t), n, s, fraction)
            kept = {name: int(m.sum()) for name, m in method.masks.items()}
            if scope == "layer":
                assert kept == {name: round(d * size) for name, size in sizes.items()}, t
            else:
                assert sum(kept.values()) == round(d * sum(sizes.values())), t
            # the threshold separates: every weight dropped now was no larger than every weight kept
            groups = [[name] for name in sizes] if scope == "layer" else [list(sizes)]
            for group in groups:
                dropped = torch.cat([weights[g][previous[g] & ~method.masks[g]] for g in group])
                survived = torch.cat([weights[g][method.masks[g]] for g in group])
                assert dropped.numel() > 0 and dropped.max() <= survived.min(), (t, group)
        else:
            assert all(torch.equal(previous[name], m) for name, m in method.masks.items()), t
        previous = {name: mask.clone() for name, mask in method.masks.items()}
    kept = sum(int(m.sum()) for _, m in method.masks.items())
    if scope == "global":
        assert kept == round(0.1 * sum(sizes.values()))
    assert method.masks.density() == pytest.approx(0.1, abs=0.01) and method.prunes_done == n


def test_state_dict_continues_exactly() -> None:
    """Stop after two of three prunes, rebuild from state_dict, continue: the same masks as one uninterrupted method."""
    def make() -> tuple[TwoLinear, IterativePruning]:
        model = TwoLinear()
        return model, iterative(model, steps_per_epoch=2, epochs=6, density=0.2, prunes=3, start_epoch=1)

    model_a, straight = make()
    straight.setup()
    for step in range(12):
        straight.after_step(step)
    model_b, first = make()
    first.setup()
    for step in range(4):                                   # prunes at t = 2 and t = 4 done
        first.after_step(step)
    state = first.state_dict()
    assert state["prunes_done"] == 2 and state["stored"] is None
    model_c, second = make()
    model_c.load_state_dict(model_b.state_dict())
    second.masks.load_state_dict(first.masks.state_dict())      # the trainer restores the masks first
    second.load_state_dict(state)
    assert second.prunes_done == 2 and second.last_fraction == first.last_fraction
    for step in range(4, 12):
        second.after_step(step)
    for name, mask in straight.masks.items():
        assert torch.equal(mask, second.masks[name]), name
    assert second.prunes_done == 3 and second.target == straight.target == 0.8


# ------------------------------------------------------------------ config checks
BASE = ["sparsity.method=iterative", "sparsity.density=0.1", "sparsity.prunes=3", "sparsity.every_epochs=2",
        "sparsity.start_epoch=1"]


@pytest.mark.parametrize("override,start", [
    ("sparsity.fraction=linear", "sparsity.fraction "),
    ("sparsity.density=1.0", "sparsity.density "),
    ("sparsity.density=0.0", "sparsity.density "),
    ("sparsity.prunes=0", "sparsity.prunes "),
    ("sparsity.every_epochs=0", "sparsity.every_epochs "),
    ("sparsity.start_epoch=-1", "sparsity.start_epoch "),
    ("sparsity.scope=unit", "sparsity.scope "),
    ("train.epochs=5", "sparsity.start_epoch + (prunes - 1) * every_epochs = 1 + (3 - 1) * 2 = 5"),
])
def test_config_errors(override: str, start: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, "train.epochs=10", override])
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message, message


def test_last_prune_needs_a_post_prune_epoch() -> None:
    with pytest.raises(ConfigError, match=r"^sparsity\..*train\.epochs=5; set train\.epochs above 5"):
        load_config(None, [*BASE, "train.epochs=5"])
    cfg = load_config(None, [*BASE, "train.epochs=6"])             # one epoch after the last prune: accepted
    assert isinstance(cfg.sparsity, IterativeConfig) and cfg.sparsity.last_prune_epoch() == 5
    assert IterativeConfig().fraction == "cubic" and IterativeConfig().start_epoch == 1
    with pytest.raises(ValueError, match="^sparsity.start_epoch"):      # the method refuses a short run too
        iterative(TwoLinear(), steps_per_epoch=2, epochs=5, prunes=3, every_epochs=2)


# ------------------------------------------------------------------ end to end on digits
SMALL = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[64,32]", "optim.lr=0.05",
         "lr_schedule.name=constant", "monitor.progress=false", "checkpoint.keep=10", "train.epochs=6",
         "sparsity.method=iterative", "sparsity.density=0.1", "sparsity.prunes=3", "sparsity.every_epochs=1",
         "sparsity.start_epoch=1", "sparsity.scope=global"]
STEPS_PER_EPOCH = 23     # 1437 training digits in batches of 64


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One uninterrupted 6-epoch run: prunes after epochs 1, 2, 3, then 3 epochs of fine-tuning."""
    out = tmp_path_factory.mktemp("iterative")
    summary = train(load_config(None, [*SMALL, f"output_dir={out}", "name=straight"]))
    return summary, out


def latest_state(run_dir: Path) -> dict:
    url = Checkpointer(str(run_dir / "checkpoints")).latest()
    assert url is not None
    return load_state(url)


def assert_same_end(a: dict, b: dict) -> None:
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, mask in a["masks"].items():
        assert torch.equal(mask, b["masks"][name]), name
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    assert a["method"]["prunes_done"] == b["method"]["prunes_done"] == 3
    assert a["step"] == b["step"] == 6 * STEPS_PER_EPOCH


def test_end_to_end_exact_density_and_accuracy(straight: tuple[dict, Path]) -> None:
    summary, out = straight
    assert summary["steps"] == 6 * STEPS_PER_EPOCH
    numel = sum(layer["numel"] for layer in summary["layers"].values())
    kept = sum(layer["kept"] for layer in summary["layers"].values())
    assert kept == round(0.1 * numel) and summary["density"] == kept / numel
    assert all(layer["nonzero"] <= layer["kept"] for layer in summary["layers"].values())
    assert summary["test_acc"] >= 0.85      # measured 0.936-0.944 over seeds 0-2; chance is 0.1
    events = EventAccumulator(str(out / "straight" / "tensorboard"))
    events.Reload()
    prunes = events.Scalars("method/iterative/prune")
    assert [(e.step, e.value) for e in prunes] == [(23, 1.0), (46, 2.0), (69, 3.0)]
    assert events.Scalars("method/iterative/density")[-1].value == pytest.approx(0.1, abs=1e-4)


def test_resume_auto_after_a_shorter_run(straight: tuple[dict, Path]) -> None:
    _, out = straight
    args = [*SMALL, f"output_dir={out}", "name=short", "resume=auto"]
    first = train(load_config(None, [*args, "train.epochs=4"]))    # all prunes done, one epoch of fine-tuning
    assert first["epochs"] == 4
    second = train(load_config(None, args))
    assert second["run_dir"] == first["run_dir"] and second["epochs"] == 6
    assert_same_end(latest_state(out / "straight"), latest_state(out / "short"))


def test_resume_auto_between_prunes(straight: tuple[dict, Path]) -> None:
    """A run preempted after epoch 2 (two prunes done, one to come) resumes with resume=auto and ends the same."""
    summary, out = straight
    shutil.copytree(out / "straight", out / "preempted")
    (out / "preempted" / "summary.json").unlink()
    for ckpt in (out / "preempted" / "checkpoints").glob("ckpt-*.pt"):
        if int(ckpt.name[len("ckpt-e"):].split("-")[0]) > 2:
            ckpt.unlink()
    assert latest_state(out / "preempted")["method"]["prunes_done"] == 2
    resumed = train(load_config(None, [*SMALL, f"output_dir={out}", "name=preempted", "resume=auto"]))
    assert resumed["run_dir"].endswith("preempted") and resumed["test_acc"] == summary["test_acc"]
    assert_same_end(latest_state(out / "straight"), latest_state(out / "preempted"))

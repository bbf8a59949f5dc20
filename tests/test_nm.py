"""N:M sparsity: hand-computed masks on tiny layers, exact groups for every scorer, gradual and training, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import ConfigError
from engine.run_config import load_config
from launcher.common import check_model_fits
from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig
from pruning.methods.gradual import GradualConfig
from pruning.methods.grasp import GraSPConfig
from pruning.methods.snip import DataScoredConfig
from pruning.methods.structured_snip import StructuredSNIPConfig
from pruning.methods.synflow import SynFlowConfig
from pruning.schedules import LinearConfig, OneShotInitConfig
from pruning.scopes import BudgetError, NMScope, build_scope, parse_nm

pytestmark = pytest.mark.usefixtures("one_thread")


def groups_kept(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept weights per group of m consecutive weights of each row (the weight viewed as (out, fan-in))."""
    return mask.reshape(mask.shape[0], -1).reshape(-1, m).sum(1)


# ------------------------------------------------------------------ the scope
def test_two_of_four_on_a_linear_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, -1.0, 2.0, 3.0],
                           [7.0, 7.0, 7.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    mask = build_scope("global", {"w": scores.shape}, nm=[2, 4]).select({"w": scores}, 0.5)["w"]
    # row 0: {0.9, 0.5} of the first group, {4, 3} of the second; row 1: ties go to the lower index
    assert mask.int().tolist() == [[0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 1, 1, 0, 0]]


def test_conv_groups_run_along_the_flattened_fan_in() -> None:
    # a (2, 2, 2, 2) conv: each filter's fan-in is in_channel x kh x kw = 8 in memory order, cut into two groups of 4
    scores = torch.arange(16.0).reshape(2, 2, 2, 2)
    scores[1, 0, 0, 0] = 100.0
    mask = build_scope("layer", {"conv": scores.shape}, nm=(1, 4)).select({"conv": scores}, 0.25)["conv"]
    assert mask.reshape(2, 8).int().tolist() == [[0, 0, 0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("nm", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)])
def test_every_group_keeps_exactly_n_of_m(nm: tuple[int, int]) -> None:
    n, m = nm
    shapes = {"fc": torch.Size([6, 16]), "conv": torch.Size([5, 8, 3, 3]), "one": torch.Size([3, 8, 1, 1])}
    scope = build_scope("global", shapes, nm=nm)
    generator = torch.Generator().manual_seed(0)
    scores = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    masks = scope.select(scores, n / m)
    for name, mask in masks.items():
        assert mask.shape == shapes[name]
        assert groups_kept(mask, m).eq(n).all(), name
        # the kept ones are the group's highest scores
        s, k = scores[name].reshape(-1, m), mask.reshape(-1, m)
        assert (s.masked_fill(~k, float("inf")).min(1).values >= s.masked_fill(k, -float("inf")).max(1).values).all()
    scope.check(masks, n / m)
    assert scope.targets(n / m) == {name: n / m for name in shapes}


def test_ties_keep_the_lowest_index_of_every_group() -> None:
    scope = build_scope("global", {"w": (3, 8)}, nm=[2, 4])
    mask = scope.select({"w": torch.ones(3, 8)}, 0.5)["w"]
    assert mask.int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]] * 3
    again = scope.select({"w": torch.ones(3, 8)}, 0.5)["w"]
    assert torch.equal(mask, again)


def test_carry_only_shrinks_and_caps_groups_at_what_they_keep() -> None:
    scope = build_scope("global", {"w": (1, 8)}, nm=[2, 4])
    kept = {"w": torch.tensor([[1, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)}
    scores = {"w": torch.tensor([[0.0, 9.0, 9.0, 9.0, 1.0, 4.0, 3.0, 2.0]])}
    mask = scope.select(scores, 0.5, kept)["w"]
    # the first group has one weight alive: it keeps that one (never the pruned 9s); the second keeps {4, 3}
    assert mask.int().tolist() == [[1, 0, 0, 0, 0, 1, 1, 0]]


def test_check_names_the_first_broken_group() -> None:
    scope = build_scope("global", {"w": (2, 8)}, nm=[2, 4])
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1], [1, 0, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(BudgetError, match=r"w row 1 weights 4\.\.7 keep 3 of 4, the pattern is 2:4"):
        scope.check({"w": mask}, 0.5)


@pytest.mark.parametrize("value, message", [
    ([2, 2], "1 <= N < M"), ([0, 4], "1 <= N < M"), ([5, 4], "1 <= N < M"), ([2], r"must be \[N, M\]"),
    ("2:4", r"must be \[N, M\]"), ([2.0, 4], r"must be \[N, M\]"), ([True, 4], r"must be \[N, M\]")])
def test_bad_nm_is_refused_in_one_line(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse_nm(value)
    assert "\n" not in str(error.value)


def test_a_fan_in_that_is_not_a_multiple_of_m_is_refused_naming_the_layer() -> None:
    with pytest.raises(ValueError, match=r"stem.weight has 27 \(1 more layers too\): leave it dense with "
                                         r"sparsity.targets.exclude=\[stem.weight, bias\]"):
        NMScope({"stem.weight": (16, 3, 3, 3), "body.weight": (16, 16, 3, 3), "bias": (16,)}, 2, 4)


# ------------------------------------------------------------------ methods
class Net(nn.Module):
    """A conv (fan-in 4 * 2 * 2 = 16) then a linear (fan-in 8 * 3 * 3 = 72): both divisible by 4 and 8."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 2)
        self.fc = nn.Linear(72, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, 4, 4, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2]))]


@pytest.mark.parametrize("config", [
    AtInitConfig(method="magnitude", density=0.5, nm=[2, 4]),
    AtInitConfig(method="random", density=0.25, nm=[2, 8]),
    DataScoredConfig(method="snip", density=0.5, nm=[2, 4], samples_per_class=2),
    GraSPConfig(method="grasp", density=0.5, nm=[2, 4], samples_per_class=2),
    SynFlowConfig(method="synflow", density=0.5, nm=[2, 4], iterations=5),
], ids=lambda c: c.method)
def test_every_scorer_at_init_gives_an_exact_nm_mask(config: AtInitConfig) -> None:
    model = Net()
    method = build_method(config, model, None, MethodContext(batches=data, input_shape=(4, 4, 4)))
    method.setup()
    n, m = config.nm
    for name, mask in method.masks.items():
        assert groups_kept(mask, m).eq(n).all(), name
        assert torch.count_nonzero(method.params[name]) <= mask.sum()
    if config.method == "magnitude":   # the kept weights are each group's largest |w|
        w = method.params["fc.weight"].detach().reshape(-1, 4)
        assert torch.equal(method.masks["fc.weight"].reshape(-1, 4),
                           torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().topk(2, 1).indices, True))
    # the MaskSet now checks the pattern on every verification: a broken update is refused
    broken = {name: torch.ones_like(mask) for name, mask in method.masks.items()}
    with pytest.raises(BudgetError, match="pattern is 2:"):
        method.masks.update(broken)


def test_training_keeps_the_pattern() -> None:
    model = Net()
    method = build_method(AtInitConfig(method="magnitude", density=0.5, nm=[2, 4]), model, None, MethodContext())
    method.setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = {name: mask.clone() for name, mask in method.masks.items()}
    (x, y), = data()
    for step in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        method.before_step(step)
        optimizer.step()
        method.after_step(step)
    for name, param in method.params.items():
        assert torch.equal(method.masks[name], before[name])
        assert not param.detach()[~before[name]].any(), name      # pruned weights stay exactly zero
        assert groups_kept(param.detach() != 0, 4).le(2).all()
    method.masks.verify()


def test_gradual_steps_down_the_groups_and_ends_exactly_n_of_m() -> None:
    model = Net()
    schedule = LinearConfig(final_sparsity=0.75, start=0, end=4, prune_freq=1)
    method = build_method(GradualConfig(method="gradual", schedule=schedule, nm=[1, 4], carry_mask=True), model,
                          None, MethodContext(steps_per_epoch=4))
    method.setup()
    seen = []
    for step in range(4):
        method.after_step(step)
        seen.append(sorted({int(k) for mask in method.masks.masks.values() for k in groups_kept(mask, 4)}))
    # sparsity 0.1875, 0.375, 0.5625, 0.75: round(d * 4) kept per group = 3, 2 (2.5 rounds to even), 2, 1
    assert seen == [[3], [2], [2], [1]]
    assert method.masks.pattern_check is not None
    method.check_budget(method.scope, 0.25)


def test_gradual_one_shot_nm_keeps_the_largest_of_each_group() -> None:
    model = Net()
    method = build_method(GradualConfig(method="gradual", schedule=OneShotInitConfig(final_sparsity=0.5),
                                        nm=[2, 4]), model, None, MethodContext(steps_per_epoch=4))
    method.setup()
    w = model.conv.weight.detach()
    assert groups_kept(method.masks["conv.weight"], 4).eq(2).all()
    assert torch.count_nonzero(w) == w.numel() // 2


@pytest.mark.parametrize("make, message", [
    (lambda: AtInitConfig(method="magnitude", density=0.1, nm=[2, 4]),
     r"nm \[2, 4\] keeps 2 of every 4 weights, density 0.5; set sparsity.density to 0.5 \(got 0.1\)"),
    (lambda: AtInitConfig(method="magnitude", density=0.5, nm=[2, 4], selection="reference"),
     "needs sparsity.selection=exact"),
    (lambda: AtInitConfig(method="magnitude", density=0.5, nm=[2, 4], scope="layer", distribution="erk"),
     "needs sparsity.distribution=uniform"),
    (lambda: AtInitConfig(method="magnitude", density=0.5, nm=[4, 4]), "1 <= N < M"),
    (lambda: StructuredSNIPConfig(method="structured_snip", density=0.5, nm=[2, 4]), "drop sparsity.nm"),
    (lambda: GradualConfig(method="gradual", schedule=LinearConfig(final_sparsity=0.9), nm=[2, 4]),
     r"set sparsity.schedule.final_sparsity=0.5 \(got 0.9\)"),
])
def test_contradictory_settings_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


SMALL = ["data.name=digits", "data.batch_size=64", "model.name=conv", "model.options.width=8", "optim.lr=0.05",
         "monitor.progress=false", "monitor.tensorboard=false", "train.max_steps_per_epoch=3", "train.epochs=2"]


def test_config_refuses_a_layer_that_cannot_be_grouped_before_any_worker() -> None:
    cfg = load_config(None, [*SMALL, "sparsity.method=magnitude", "sparsity.density=0.5", "sparsity.nm=[2,4]"])
    assert cfg.sparsity.nm == [2, 4]
    with pytest.raises(ValueError, match=r"features.0.weight has 9: leave it dense with "
                                         r"sparsity.targets.exclude=\[features.0.weight\]"):
        check_model_fits(cfg)
    check_model_fits(load_config(None, [*SMALL, "sparsity.method=magnitude", "sparsity.density=0.5",
                                        "sparsity.nm=[2,4]", "sparsity.targets.exclude=[features.0.weight]"]))
    with pytest.raises(ConfigError, match="sparsity.density to 0.5"):
        load_config(None, [*SMALL, "sparsity.method=magnitude", "sparsity.nm=[2,4]"])


def test_static_nm_training_end_to_end(tmp_path: Path) -> None:
    from engine.checkpoint import load_state
    from engine.trainer import train

    summary = train(load_config(None, [*SMALL, "sparsity.method=magnitude", "sparsity.density=0.5",
                                       "sparsity.nm=[2,4]", "sparsity.targets.exclude=[features.0.weight]",
                                       f"output_dir={tmp_path}", "name=nm"]))
    assert summary["steps"] == 6
    state = load_state(str(sorted((tmp_path / "nm" / "checkpoints").glob("ckpt-*.pt"))[-1]))
    for name, mask in state["masks"].items():
        assert groups_kept(mask, 4).eq(2).all(), name
        weight = state["model"][name]
        assert not weight[~mask].any(), name

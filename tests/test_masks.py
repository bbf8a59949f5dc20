"""Masks and accounting on tiny hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pruning.agreement import mask_checksums, seeded_generator
from pruning.masks import MaskSet, parameter_counts
from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig
from pruning.selection import apportion, global_top_k, keep_top_k, kth_largest, layer_counts, layer_densities
from pruning.targets import TargetConfig, prunable_parameters
from pruning.timing import IterationDensities


def test_keep_top_k_exact_with_ties_broken_by_index() -> None:
    scores = torch.tensor([0.5, 0.2, 0.5, 0.9, 0.5, 0.1])
    assert keep_top_k(scores, 3).tolist() == [True, False, True, True, False, False]
    assert keep_top_k(scores, 0).sum() == 0 and keep_top_k(scores, 6).all()
    with pytest.raises(ValueError, match="NaN"):
        keep_top_k(torch.tensor([1.0, float("nan")]), 1)


def test_kth_largest_agrees_with_kthvalue_on_every_path() -> None:
    # small k and small n - k take partial topk, the middle kthvalue; ties and -inf included
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 50, (640,), generator=gen).float()
    values[::7] = -math.inf
    for k in (1, 2, 19, 20, 21, 100, 320, 600, 619, 620, 621, 639, 640):
        assert kth_largest(values, k) == torch.kthvalue(values, 640 - k + 1).values, k
        mask = keep_top_k(values, k)
        assert int(mask.sum()) == k and bool((values[mask].min() >= values[~mask].max()) if k < 640 else True)


def test_global_top_k_uses_one_threshold_across_layers() -> None:
    scores = {"a": torch.tensor([[1.0, 8.0], [3.0, 4.0]]), "b": torch.tensor([7.0, 2.0, 6.0])}
    masks = global_top_k(scores, 3)
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, True]


def test_apportion_largest_remainder_and_caps() -> None:
    assert apportion(10, [1, 1, 1], [10, 10, 10]) == [4, 3, 3]
    assert apportion(10, [5, 1, 1], [2, 10, 10]) == [2, 4, 4]
    assert sum(apportion(7, [0.3, 0.3, 0.4], [3, 3, 3])) == 7


def test_erk_densities_by_hand() -> None:
    # conv 4x2x3x3: raw (4+2+3+3)/(4*2*9) = 12/72; linear 10x4: raw (10+4)/40 = 14/40.
    shapes = {"conv": torch.Size([4, 2, 3, 3]), "fc": torch.Size([10, 4])}
    dens = layer_densities(shapes, 0.5, "erk")
    scale = 0.5 * (72 + 40) / (12 / 72 * 72 + 14 / 40 * 40)   # = 56 / 26
    assert dens["conv"] == pytest.approx(scale * 12 / 72)
    assert dens["fc"] == pytest.approx(scale * 14 / 40)
    # ER ignores kernel dims: raw (4+2)/8 and 14/40; at 0.9 the conv layer would exceed 1 and is capped.
    er = layer_densities(shapes, 0.9, "er")
    assert er["conv"] == 1.0
    assert er["fc"] == pytest.approx((0.9 * 112 - 72) / 40)
    counts = layer_counts(shapes, 0.5, "erk")
    assert sum(counts.values()) == 56


def test_iteration_density_schedules() -> None:
    assert IterationDensities(0.01, 2, "exponential").at(1) == pytest.approx(0.1)
    assert IterationDensities(0.01, 2, "exponential").at(2) == pytest.approx(0.01)
    assert IterationDensities(0.2, 4, "linear").at(1) == pytest.approx(0.8)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.conv.sparsity_role = "stem"
        self.fc = nn.Linear(8, 3)
        self.fc.sparsity_role = "classifier"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_targets_by_kind_role_and_pattern() -> None:
    model = Tiny()
    assert list(prunable_parameters(model, TargetConfig())) == ["conv.weight", "fc.weight"]
    assert list(prunable_parameters(model, TargetConfig(exclude_roles=["stem"]))) == ["fc.weight"]
    assert list(prunable_parameters(model, TargetConfig(layers=["conv"]))) == ["conv.weight"]
    with pytest.raises(ValueError, match="select no parameter"):
        prunable_parameters(model, TargetConfig(exclude=["*.weight"]))


def test_magnitude_local_uniform_by_hand() -> None:
    model = Tiny()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([1.0, -5.0, 2.0, 0.5, -3.0, 4.0, 0.1, -0.2]).view(2, 1, 2, 2))
        model.fc.weight.copy_(torch.arange(24, dtype=torch.float32).view(3, 8) - 12)
    cfg = AtInitConfig(method="magnitude", density=0.5, scope="layer")
    method = build_method(cfg, model, None, MethodContext())
    method.setup()
    # conv keeps 4 of 8 largest |w|: -5, -3, 4, 2
    assert method.masks["conv.weight"].view(-1).tolist() == [False, True, True, False, True, True, False, False]
    assert model.conv.weight.view(-1).tolist() == [0.0, -5.0, 2.0, 0.0, -3.0, 4.0, 0.0, 0.0]
    # fc: |i - 12| for i = 0..23 -> 12, 11..7 twice (i = 0..5 and 19..23) = 11 weights, then a tie at 6 between
    # i = 6 and i = 18: the lower index wins
    kept = method.masks["fc.weight"].view(-1).nonzero().view(-1).tolist()
    assert kept == [0, 1, 2, 3, 4, 5, 6, 19, 20, 21, 22, 23]
    stats = {s.name: s for s in method.layer_stats()}
    assert (stats["conv.weight"].kept, stats["conv.weight"].nonzero, stats["conv.weight"].density) == (4, 4, 0.5)
    assert stats["fc.weight"].kept == 12


def test_random_pruning_is_exact_and_seeded_per_name() -> None:
    outcomes = []
    for _ in range(2):
        torch.manual_seed(123 + len(outcomes))   # different global RNG state: the mask must not depend on it
        model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 30))
        method = build_method(AtInitConfig(method="random", density=0.3), model, None, MethodContext(seed=7))
        method.setup()
        assert sum(int(m.sum()) for _, m in method.masks.items()) == round(0.3 * (50 * 40 + 40 * 30))
        outcomes.append({n: m.clone() for n, m in method.masks.items()})
    assert all(torch.equal(outcomes[0][n], outcomes[1][n]) for n in outcomes[0])
    a = torch.randn(5, generator=seeded_generator(7, 1, "x"))
    assert torch.equal(a, torch.randn(5, generator=seeded_generator(7, 1, "x")))
    assert not torch.equal(a, torch.randn(5, generator=seeded_generator(7, 1, "y")))


def test_erk_magnitude_hits_global_target_exactly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32 * 4, 10))
    cfg = AtInitConfig(method="magnitude", density=0.1, scope="layer", distribution="erk")
    method = build_method(cfg, model, None, MethodContext())
    method.setup()
    total = sum(p.numel() for p in method.params.values())
    assert sum(s.kept for s in method.layer_stats()) == round(0.1 * total)
    targets = method.layer_targets()
    assert targets is not None and max(targets.values()) <= 1.0


def test_update_prunes_grows_and_zeroes_optimizer_state() -> None:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    masks = MaskSet({"weight": layer.weight})
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    opt.step()
    first = torch.tensor([[True, False, True], [False, True, True]])
    change = masks.update({"weight": first}, optimizer=opt)["weight"]
    assert (change.dropped, change.grown) == (2, 0)
    assert layer.weight[0, 1] == 0 and layer.weight[1, 0] == 0
    second = torch.tensor([[True, True, False], [False, True, True]])
    values = torch.full((2, 3), 0.25)
    change = masks.update({"weight": second}, optimizer=opt, grow_values={"weight": values})["weight"]
    assert (change.dropped, change.grown) == (1, 1)
    assert layer.weight[0, 1] == 0.25 and layer.weight[0, 2] == 0
    state = opt.state[layer.weight]
    assert state["exp_avg"][0, 1] == 0 and state["exp_avg_sq"][0, 1] == 0
    assert state["exp_avg"][0, 0] != 0   # untouched positions keep their moments


def test_grad_masking_and_state_round_trip() -> None:
    layer = nn.Linear(4, 4)
    masks = MaskSet({"weight": layer.weight})
    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    masks.update({"weight": mask})
    layer(torch.randn(2, 4)).pow(2).sum().backward()
    masks.mask_grads_()
    assert (layer.weight.grad[~mask] == 0).all() and (layer.weight.grad[mask] != 0).all()
    saved = masks.state_dict()
    other = MaskSet({"weight": layer.weight})
    other.load_state_dict(saved)
    assert torch.equal(other["weight"], mask)
    with pytest.raises(ValueError, match="do not match this model"):
        other.load_state_dict({"bias": mask})


def test_checksums_see_position_not_just_count() -> None:
    a = {"w": torch.tensor([True, False, True, False])}
    b = {"w": torch.tensor([False, True, True, False])}
    ca, cb = mask_checksums(a), mask_checksums(b)
    assert ca[0, 0] == cb[0, 0] == 2
    assert ca[0, 1] != cb[0, 1]


def test_parameter_counts() -> None:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0] = 1.0
    total, nonzero = parameter_counts(layer)
    assert total == 8 and nonzero == 1 + int(torch.count_nonzero(layer.bias))
    assert math.isclose(MaskSet({"w": layer.weight}).density(), 1.0)

"""Pruning at init as the Synaptic Flow code does it: its selection rule, its batch weighting, its schedule's floats,
and the fast exact k-th value the loop relies on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig
from pruning.methods.snip import DataScoredConfig
from pruning.methods.synflow import SynFlowConfig
from pruning.scopes import build_scope
from pruning.selection import SAMPLE, kth_smallest, prune_at_or_below
from pruning.timing import IterationDensities


# ------------------------------------------------------------------------------------------- k-th smallest
@pytest.mark.parametrize("kind", ["uniform", "normal", "ties", "pruned_block", "structured"])
def test_kth_smallest_is_kthvalue_on_every_path(kind: str) -> None:
    n = 12 * SAMPLE + 7        # above the size where the sampled bracket is used
    g = torch.Generator().manual_seed(1)
    values = {"uniform": lambda: torch.rand(n, generator=g),
              "normal": lambda: torch.randn(n, generator=g),
              "ties": lambda: torch.randint(0, 5, (n,), generator=g).float(),
              "pruned_block": lambda: torch.cat([torch.full((n // 3,), -math.inf), torch.rand(n - n // 3,
                                                                                               generator=g)]),
              "structured": lambda: torch.arange(n).float().remainder(9).mul(1e15)}[kind]()
    for k in (1, 2, 100, n // 3, n // 3 + 1, n // 2, n - 100, n - 1, n):
        assert kth_smallest(values, k) == torch.kthvalue(values, k).values, (kind, k)


# ---------------------------------------------------------------------------------------- the reference rule
def test_reference_rule_prunes_every_tie_at_the_threshold() -> None:
    scores = torch.tensor([4.0, 2.0, 1.0, 2.0, 3.0, 2.0])
    # k = floor((1 - 0.5) * 6) = 3: the 3rd smallest is 2, and every score <= 2 goes (4 pruned, not 3)
    assert prune_at_or_below(scores, 3).tolist() == [True, False, False, False, True, False]
    masks = build_scope("global", {"w": (6,)}).select({"w": scores}, 0.5, rule="reference")
    assert masks["w"].tolist() == [True, False, False, False, True, False]
    # the exact rule keeps round(0.5 * 6) = 3: the tie at 2 goes to the lowest index
    exact = build_scope("global", {"w": (6,)}).select({"w": scores}, 0.5)
    assert exact["w"].tolist() == [True, True, False, False, True, False]


def test_reference_rule_counts_pruned_weights_as_zero_scores_and_never_revives_them() -> None:
    scores = {"a": torch.tensor([5.0, 0.5, 7.0, 1.0]), "b": torch.tensor([3.0, 6.0, -1.0, 2.0])}
    kept = {"a": torch.tensor([True, False, True, True]), "b": torch.tensor([True, True, True, False])}
    # all 8 scores, pruned ones as 0: [5, 0, 7, 1, 3, 6, -1, 0]; density 0.5 -> k = 4, 4th smallest = 1
    masks = build_scope("global", {"a": (4,), "b": (4,)}).select(scores, 0.5, kept, rule="reference")
    assert masks["a"].tolist() == [True, False, True, False]
    assert masks["b"].tolist() == [True, True, False, False]
    per_layer = build_scope("layer", {"a": (4,), "b": (4,)}).select(scores, 0.5, kept, rule="reference")
    # a: [5, 0, 7, 1], k = 2, 2nd smallest = 1; b: [3, 6, -1, 0], k = 2, 2nd smallest = 0
    assert per_layer["a"].tolist() == [True, False, True, False]
    assert per_layer["b"].tolist() == [True, True, False, False]


def test_reference_rule_is_refused_by_scopes_that_have_only_the_exact_rule() -> None:
    with pytest.raises(ValueError, match="only the exact rule"):
        build_scope("row", {"w": (2, 3)}).select({"w": torch.rand(2, 3)}, 0.5, rule="reference")


class Recorder:
    """Kept counts after every mask update of a method."""

    def __init__(self, method: object) -> None:
        self.counts: list[int] = []
        update = method.masks.update

        def recording(*args: object, **kwargs: object) -> object:
            result = update(*args, **kwargs)
            self.counts.append(sum(int(m.sum()) for _, m in method.masks.items()))
            return result

        method.masks.update = recording


def synflow_mlp(selection: str, density: float, iterations: int) -> tuple[object, Recorder, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                          nn.Linear(24, 5))
    cfg = SynFlowConfig(method="synflow", density=density, iterations=iterations, selection=selection,
                        precision="float32")
    method = build_method(cfg, model, None, MethodContext(input_shape=(1, 4, 4)))
    recorder = Recorder(method)
    method.setup()
    return method, recorder, sum(p.numel() for p in method.params.values())


def test_synflow_under_the_reference_rule_keeps_n_minus_floor_at_every_iteration() -> None:
    method, recorder, n = synflow_mlp("reference", density=0.05, iterations=20)
    densities = IterationDensities(0.05, 20, "exponential")
    assert recorder.counts == [n - int((1.0 - d) * n) for _, d in densities]
    assert method.selection_note is None


def test_synflow_under_the_exact_rule_keeps_round_d_n_and_checks_it() -> None:
    method, recorder, n = synflow_mlp("exact", density=0.05, iterations=20)
    assert recorder.counts == [round(d * n) for _, d in IterationDensities(0.05, 20, "exponential")]


def test_a_shortfall_under_the_reference_rule_is_reported_not_raised() -> None:
    def magnitude(first: float) -> object:
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4, bias=False))
        with torch.no_grad():
            model[1].weight.copy_(torch.tensor([[1.0] * 4] * 2 + [[2.0, 3.0, 4.0, 5.0]] * 2))
            model[1].weight[0, 0] = first
        method = build_method(AtInitConfig(method="magnitude", density=0.5, selection="reference"), model, None,
                              MethodContext())
        method.setup()
        return method

    exact = magnitude(1.0)    # k = floor(0.5 * 16) = 8; the 8th smallest |w| is 1: the eight 1s go, 8 kept
    assert int(exact.masks["1.weight"].sum()) == 8 and exact.selection_note is None
    short = magnitude(2.0)    # seven 1s, then 2 2 2: the 8th smallest is 2 and all ten <= 2 go, 6 kept
    assert int(short.masks["1.weight"].sum()) == 6
    assert "keeps 6 weights, the rule's count is 8" in short.selection_note


def test_linear_schedule_uses_the_reference_floats() -> None:
    for rho in (0.1, 0.03, 1e-3):
        for k in range(1, 101):
            assert IterationDensities(rho, 100, "linear").at(k) == 1.0 - (1.0 - rho) * (k / 100)
            assert IterationDensities(rho, 100, "exponential").at(k) == rho ** (k / 100)


# -------------------------------------------------------------------------------------- batch weighting
def tiny_snip(weighting: str) -> torch.Tensor:
    """SNIP's scores of a 3x2 linear model on 3 samples in scoring batches of 2 (the last batch has 1 sample)."""
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]))
    inputs = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [2.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    cfg = DataScoredConfig(method="snip", density=0.5, samples_per_class=2, scoring_batch_size=2,
                           batch_weighting=weighting)
    method = build_method(cfg, model, None, MethodContext(batches=lambda: [(inputs, labels)]))
    return method.scores(1)["0.weight"]


def by_hand_gradient(samples: list[int]) -> torch.Tensor:
    """d CE / d W summed over ``samples``: (softmax(W x) - onehot(y)) x^T for a bias-free linear layer."""
    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [2.0, 1.0, 1.0]])
    y = [0, 1, 0]
    total = torch.zeros(2, 3)
    for i in samples:
        z = w @ x[i]
        p = torch.exp(z) / torch.exp(z).sum()
        p[y[i]] -= 1.0
        total += torch.outer(p, x[i])
    return total


def test_snip_sums_each_batch_mean_gradient_so_a_short_last_batch_counts_as_much_as_a_full_one() -> None:
    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    grad = by_hand_gradient([0, 1]) / 2 + by_hand_gradient([2])       # batch of 2 (mean) + batch of 1
    expected = (w * grad).abs() / (w * grad).abs().sum()
    assert torch.allclose(tiny_snip("batch_mean"), expected, atol=1e-6)
    per_sample = by_hand_gradient([0, 1, 2]) / 3
    assert torch.allclose(tiny_snip("sample"), (w * per_sample).abs() / (w * per_sample).abs().sum(), atol=1e-6)
    assert not torch.allclose(tiny_snip("batch_mean"), tiny_snip("sample"), atol=1e-4)

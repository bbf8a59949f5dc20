"""Pruning-at-init scorers on tiny networks, every score computed by hand (softmax algebra, path products)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher.prune import critical_compression, parse_compressions
from pruning.methods import MethodContext, build_method, method_class
from pruning.methods.grasp import GraSPConfig
from pruning.methods.snip import DataScoredConfig
from pruning.methods.structured_snip import StructuredSNIPConfig
from pruning.methods.synflow import SynFlowConfig
from pruning.scores import balanced_batches, float32_trouble, input_sizes, synflow_scores, unit_compute
from pruning.selection import keep_top_units

REPO = Path(__file__).resolve().parents[1]
W = [[1.0, -2.0], [0.5, 3.0]]
SAMPLES = [([1.0, 2.0], 0), ([-1.0, 0.5], 1), ([2.0, -1.0], 1)]


def linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight), bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float64))
    return layer


def batches(samples: list[tuple[list[float], int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One sample per batch, so the scorers must combine batches."""
    return [(torch.tensor([x], dtype=torch.float64), torch.tensor([y])) for x, y in samples]


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def logits(x: list[float], t: float = 1.0) -> list[float]:
    return [sum(W[i][k] * x[k] for k in range(2)) / t for i in range(2)]


def mean_grad(samples: list[tuple[list[float], int]], t: float = 1.0) -> list[list[float]]:
    """dL/dW_ik = (p_i - [i = y]) x_k / T, averaged over samples."""
    g = [[0.0, 0.0], [0.0, 0.0]]
    for x, y in samples:
        p = softmax(logits(x, t))
        for i in range(2):
            for k in range(2):
                g[i][k] += (p[i] - (i == y)) * x[k] / t / len(samples)
    return g


def by_hand_snip(samples: list[tuple[list[float], int]]) -> torch.Tensor:
    g = mean_grad(samples)
    s = [[abs(W[i][k] * g[i][k]) for k in range(2)] for i in range(2)]
    total = sum(map(sum, s))
    return torch.tensor(s, dtype=torch.float64) / total


# ----------------------------------------------------------------------------------------------------- SNIP
def test_snip_sums_gradients_over_every_batch_and_normalises() -> None:
    model = linear(W)
    method = build_method(DataScoredConfig(method="snip", density=0.5), model, None,
                          MethodContext(batches=lambda: batches(SAMPLES)))
    scores = method.scores(1)["weight"]
    assert torch.allclose(scores, by_hand_snip(SAMPLES), rtol=1e-12)
    assert float(scores.sum()) == pytest.approx(1.0)
    assert not torch.allclose(scores, by_hand_snip(SAMPLES[-1:]))   # the last batch alone (the reference bug)
    assert model.weight.grad is None   # scoring leaves no gradients behind
    method.setup()
    expected = by_hand_snip(SAMPLES).reshape(-1).topk(2).indices.sort().values
    assert method.masks["weight"].reshape(-1).nonzero().reshape(-1).tolist() == expected.tolist()


def test_balanced_batches_take_samples_per_class_and_share_them_over_ranks() -> None:
    model = linear(W)
    stream = [(torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 0, 1, 0])) for _ in range(3)]
    taken = balanced_batches(stream, model, per_class=3)
    labels = torch.cat([y for _, y in taken])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1] and [len(y) for _, y in taken] == [4, 2]
    shares = [torch.cat([y for _, y in balanced_batches(stream, model, 3, rank, 2)]) for rank in range(2)]
    assert [int((s == 0).sum()) for s in shares] == [2, 1]   # 3 per class dealt over 2 ranks


def test_train_mode_scoring_restores_batch_norm_statistics() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    data = [(torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))]
    method = build_method(DataScoredConfig(method="snip", density=0.5, train_mode=True), model, None,
                          MethodContext(batches=lambda: data))
    method.scores(1)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------- GraSP
def by_hand_grasp(samples: list[tuple[list[float], int]], t: float) -> torch.Tensor:
    """H_(ik),(jl) = x_k x_l (p_i [i = j] - p_i p_j) / T^2 per sample; Hg averaged over samples."""
    g = mean_grad(samples, t)
    hg = [[0.0, 0.0], [0.0, 0.0]]
    for x, _ in samples:
        p = softmax(logits(x, t))
        for i in range(2):
            for k in range(2):
                for j in range(2):
                    for l in range(2):
                        h = x[k] * x[l] * (p[i] * (i == j) - p[i] * p[j]) / t**2
                        hg[i][k] += h * g[j][l] / len(samples)
    s = [[W[i][k] * hg[i][k] for k in range(2)] for i in range(2)]
    return torch.tensor(s, dtype=torch.float64) / (abs(sum(map(sum, s))) + 1e-10)


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_hessian_gradient_product_by_hand(temperature: float) -> None:
    model = linear(W)
    cfg = GraSPConfig(method="grasp", density=0.5, temperature=temperature)
    method = build_method(cfg, model, None, MethodContext(batches=lambda: batches(SAMPLES)))
    scores = method.scores(1)["weight"]
    expected = by_hand_grasp(SAMPLES, temperature)
    assert torch.allclose(scores, expected, rtol=1e-9, atol=1e-15)
    assert GraSPConfig().temperature == 200.0


def test_grasp_prunes_the_lowest_theta_hg() -> None:
    model = linear(W)
    method = build_method(GraSPConfig(method="grasp", density=0.5, temperature=1.0), model, None,
                          MethodContext(batches=lambda: batches(SAMPLES)))
    method.setup()
    expected = by_hand_grasp(SAMPLES, 1.0).reshape(-1)
    kept = method.masks["weight"].reshape(-1)
    assert expected[kept].min() > expected[~kept].max()


# -------------------------------------------------------------------------------------------------- SynFlow
class PathNet(nn.Module):
    """x -> Linear(2, 2) -> BatchNorm1d -> ReLU -> Linear(2, 1): every path product is easy to write down."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)
        self.fc2 = nn.Linear(2, 1)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, -2.0], [-0.5, 3.0]]))
            self.fc1.bias.copy_(torch.tensor([-1.0, 0.25]))
            self.bn.weight.copy_(torch.tensor([-2.0, 0.5]))
            self.bn.bias.copy_(torch.tensor([1.0, -1.0]))
            self.bn.running_mean.copy_(torch.tensor([-0.5, 1.0]))
            self.bn.running_var.copy_(torch.tensor([4.0, 1.0]))
            self.fc2.weight.copy_(torch.tensor([[-3.0, 2.0]]))
            self.fc2.bias.copy_(torch.tensor([-0.75]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def by_hand_synflow() -> tuple[list[list[float]], list[list[float]], float]:
    """With |.| everywhere and x = 1: h_i = sum_k |W_ik| + |b_i|; a_i = (h_i - |mu_i|) / sqrt(|var_i| + eps) |g_i|
    + |beta_i|, positive here, so ReLU passes; R = sum_i |v_i| a_i + |c|. dR/dW_ik = |v_i| |g_i| / sqrt(...)."""
    w1, b1 = [[1.0, 2.0], [0.5, 3.0]], [1.0, 0.25]
    gamma, beta, mu, var, eps = [2.0, 0.5], [1.0, 1.0], [0.5, 1.0], [4.0, 1.0], 1e-5
    v, c = [3.0, 2.0], 0.75
    scale = [gamma[i] / math.sqrt(var[i] + eps) for i in range(2)]
    a = [(sum(w1[i]) + b1[i] - mu[i]) * scale[i] + beta[i] for i in range(2)]
    assert min(a) > 0
    s1 = [[w1[i][k] * v[i] * scale[i] for k in range(2)] for i in range(2)]
    s2 = [[v[i] * a[i] for i in range(2)]]
    return s1, s2, sum(v[i] * a[i] for i in range(2)) + c


def test_synflow_path_products_by_hand_and_state_restored_exactly() -> None:
    model = PathNet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method(SynFlowConfig(method="synflow", density=0.5), model, None,
                          MethodContext(input_shape=(2,)))
    assert method.config.iterations == 100 and method.config.schedule == "exponential"
    scores = method.scores(1)   # eval mode: a batch of one in train-mode batch norm would fail
    s1, s2, _ = by_hand_synflow()
    assert torch.allclose(scores["fc1.weight"], torch.tensor(s1), rtol=1e-5)
    assert torch.allclose(scores["fc2.weight"], torch.tensor(s2), rtol=1e-5)
    assert model.training
    for key, value in model.state_dict().items():   # signs, BN statistics, everything bit for bit
        assert torch.equal(value, before[key]) and torch.equal(value.signbit(), before[key].signbit()), key
    model.eval()
    _, R = synflow_scores(model, method.params, (2,))
    assert float(R) == pytest.approx(by_hand_synflow()[2], rel=1e-5)


def test_synflow_iterations_nest_and_hit_the_exact_count() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    method = build_method(SynFlowConfig(method="synflow", density=0.2, iterations=5), model, None,
                          MethodContext(input_shape=(6,)))
    method.setup()
    assert sum(s.kept for s in method.layer_stats()) == round(0.2 * (48 + 64 + 24))
    assert all(s.kept == s.nonzero for s in method.layer_stats())


@pytest.mark.parametrize("scale, problem", [(1e-10, "underflowed"), (1e10, "overflowed")])
def test_synflow_switches_to_float64_when_float32_fails(scale: float, problem: str) -> None:
    chain = nn.Sequential(*[nn.Linear(1, 1, bias=False) for _ in range(6)])
    with torch.no_grad():
        for layer in chain:
            layer.weight.fill_(-scale)
    params = {f"{i}.weight": layer.weight for i, layer in enumerate(chain)}
    scores, R = synflow_scores(chain, params, (1,))
    assert problem in (float32_trouble(scores, R) or "")
    method = build_method(SynFlowConfig(method="synflow", density=0.5, iterations=1), chain, None,
                          MethodContext(input_shape=(1,)))
    wide = method.scores(1)
    assert method.float64_iterations == 1 and problem in method.precision_note
    for value in wide.values():   # every weight lies on the one path: score = |w| * R / |w| = R = scale^6
        assert value.dtype == torch.float64 and float(value) == pytest.approx(scale**6, rel=1e-12)
    assert (chain[0].weight == -scale).all()


# ------------------------------------------------------------------------------------------- structured SNIP
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_unit_compute_from_recorded_input_sizes() -> None:
    model = ConvNet()
    params = {"conv.weight": model.conv.weight, "fc.weight": model.fc.weight}
    sizes = input_sizes(model, params, torch.randn(1, 1, 3, 3))
    assert sizes == {"conv.weight": 9, "fc.weight": 1}
    # conv: 2 * (3 * 3) * (1 * 2 * 2) = 72 per filter; fc: 2 * 1 * 8 = 16 per row; normalised by the largest
    assert unit_compute(params, sizes) == {"conv.weight": 1.0, "fc.weight": pytest.approx(16 / 72)}


def test_keep_top_units_global_order_within_budget() -> None:
    scores = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.7, 0.6])}
    masks = keep_top_units(scores, {"a": 4, "b": 10}, budget=18)
    # order 0.9 (a, 4) 0.7 (b, 10) 0.6 (b, 10): 4 + 10 = 14 fits, + 10 = 24 does not
    assert masks["a"].tolist() == [True, False, False] and masks["b"].tolist() == [True, False]


def test_structured_snip_keeps_whole_units_by_row_norm_of_saliency() -> None:
    model = linear([[1.0, -2.0], [0.5, 3.0], [0.1, 0.2]])
    samples = [([1.0, 2.0], 0), ([-1.0, 0.5], 1), ([2.0, -1.0], 2)]
    cfg = StructuredSNIPConfig(method="structured_snip", density=0.5)
    method = build_method(cfg, model, None, MethodContext(batches=lambda: batches(samples)))
    saliency = build_method(DataScoredConfig(method="snip", density=0.5), model, None,
                            MethodContext(batches=lambda: batches(samples))).scores(1)["weight"]
    method.setup()
    mask = method.masks["weight"]
    best = int(saliency.norm(dim=1).argmax())   # budget 3 of 6 weights: one row of 2 fits, two do not
    assert mask.all(dim=1).tolist() == [i == best for i in range(3)]
    assert int(mask.sum()) == 2 and (mask.all(dim=1) | ~mask.any(dim=1)).all()
    with pytest.raises(ValueError, match="scope must be global"):
        StructuredSNIPConfig(method="structured_snip", scope="layer")


# ----------------------------------------------------------------------------------------------- the command
def test_parse_compressions_and_critical_compression() -> None:
    assert parse_compressions("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_compressions("1,2.5") == [1.0, 2.5]
    runs = [{"compression": c, "collapsed_layers": ["x"] if c >= 2 else []} for c in (0.0, 1.0, 2.0, 3.0)]
    assert critical_compression(runs) == 1.0


def test_prune_command_runs_data_free_without_the_data_set(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "report.json"
    common = [sys.executable, "-m", "launcher", "prune", "model.name=mlp", "model.options.hidden=[32,16]",
              "data.name=cifar100", f"data.root={tmp_path}"]
    result = subprocess.run(common + ["sparsity.iterations=20", "--methods", "synflow,magnitude,random",
                                      "--compressions", "0:3:1", "--output", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["input_shape"] == [3, 32, 32] and report["num_classes"] == 100
    assert report["prunable"] == {"features.0.weight": 3072 * 32, "features.2.weight": 32 * 16,
                                  "classifier.weight": 16 * 100}
    for name, result_ in report["methods"].items():
        runs = result_["runs"]
        assert [r["compression"] for r in runs] == [0.0, 1.0, 2.0, 3.0]
        assert all(r["kept"] == round(10 ** -r["compression"] * sum(report["prunable"].values())) for r in runs)
    assert "critical compression" in result.stdout
    missing = subprocess.run(common + ["--methods", "snip", "--compressions", "1"], cwd=REPO, capture_output=True,
                             text=True, timeout=120, env=env)
    assert missing.returncode == 2 and "data error" in missing.stderr


@pytest.mark.parametrize("name", ["snip", "grasp", "synflow", "magnitude", "random"])
def test_every_scorer_hits_the_exact_count_and_only_zeroes_weights(name: str) -> None:
    """Invariants on a small conv net, 3 iterations: exact kept count, pruned weights zero, kept weights untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(2)]
    cfg = method_class(name).Config(method=name, density=0.05, iterations=3)
    method = build_method(cfg, model, None, MethodContext(batches=lambda: data))
    method.setup()
    assert sum(s.kept for s in method.layer_stats()) == round(0.05 * (36 + 432))
    for key, value in model.state_dict().items():
        mask = method.masks[key] if key in method.masks else torch.ones_like(value, dtype=torch.bool)
        assert torch.equal(value[mask], before[key][mask]) and (value[~mask] == 0).all(), key

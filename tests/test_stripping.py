"""Synaptic Stripping: the stripping ViT, dead-neuron tracking, hand-counted signed-quantile stripping, monitoring.

Hand-computed cases on a tiny vit_strip with planted dead neurons (a bias far below zero keeps a neuron's ReLU at
zero for every input), exact equality with torch.quantile's linear interpolation, the trainer's decision pass with
hooks only while it runs, and the dead-neuron curves in TensorBoard and summary.json for runs with and without
stripping. The two-rank tests are in tests/test_stripping_distributed.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import models
from engine.backends import DistEnv, build_backend, pick_device
from engine.config import ConfigError
from engine.run_config import load_config
from engine.trainer import Trainer, train
from pruning.methods import DecisionPass, MethodContext, build_method
from pruning.methods.stripping import StrippingConfig, SynapticStripping, strip_rows
from pruning.neurons import find_relu_layers, relu_sums

TINY_RUN = ["data.name=digits", "data.batch_size=64", "data.val_fraction=0.25", "model.name=vit_strip",
            "model.options.patch_size=2", "model.options.dim=16", "model.options.depth=2", "model.options.heads=2",
            "train.max_steps_per_epoch=3", "train.device=cpu", "monitor.progress=false", "optim.name=adamw",
            "optim.lr=0.01", "monitor.dead_neurons=val"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ------------------------------------------------------------------------------------------------ the model
def test_vit_strip_is_the_published_shape_with_faithful_defaults() -> None:
    model = models.build_model("vit_strip", in_channels=3, image_size=32, num_classes=10)
    # per block: q, k, v, o 4 * (384 * 384 + 384); MLP 384 * 1536 + 1536 + 1536 * 384 + 384; 2 norms 4 * 384
    block = 4 * (384 * 384 + 384) + (384 * 1536 + 1536 + 1536 * 384 + 384) + 4 * 384
    embed = (48 * 384 + 384) + 384 + 65 * 384                 # 4x4x3 patches -> 384, CLS token, 65 positions
    assert sum(p.numel() for p in model.parameters()) == 7 * block + embed + 2 * 384 + (384 * 10 + 10)
    modules = dict(model.named_modules())
    assert isinstance(modules["patch_embed"], nn.Linear) and modules["patch_embed"].in_features == 48
    assert isinstance(modules["blocks.6.mlp.act1"], nn.ReLU) and isinstance(modules["blocks.6.mlp.act2"], nn.ReLU)
    assert "blocks.7.mlp.fc1" not in modules and modules["blocks.0.attn"].heads == 8
    layers = find_relu_layers(model, (3, 32, 32))
    assert [layer.linear for layer in layers] == [f"blocks.{i}.mlp.fc{j}" for i in range(7) for j in (1, 2)]
    assert [layer.relu for layer in layers[:2]] == ["blocks.0.mlp.act1", "blocks.0.mlp.act2"]
    assert [layer.features for layer in layers[:2]] == [1536, 384]


def test_attention_divides_the_softmax_output_by_the_root_of_the_whole_width() -> None:
    torch.manual_seed(0)
    faithful = models.build_model("vit_strip", in_channels=1, image_size=4, num_classes=3, patch_size=2, dim=8,
                                  depth=1, heads=2)
    attn = faithful.blocks[0].attn
    x = torch.randn(2, 5, 8)
    q, k, v = (t.view(2, 5, 2, 4).transpose(1, 2) for t in (attn.q(x), attn.k(x), attn.v(x)))
    by_hand = (torch.softmax(q @ k.transpose(-2, -1), -1) / math.sqrt(8)) @ v
    assert torch.allclose(attn(x), attn.o(by_hand.transpose(1, 2).reshape(2, 5, 8)), atol=1e-6)
    attn.scaling = "scaled"
    standard = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), -1) @ v
    assert torch.allclose(attn(x), attn.o(standard.transpose(1, 2).reshape(2, 5, 8)), atol=1e-6)


def test_linear_patch_embedding_equals_the_strided_conv() -> None:
    torch.manual_seed(0)
    options = dict(in_channels=3, image_size=8, num_classes=4, patch_size=4, dim=8, depth=1, heads=2)
    linear = models.build_model("vit_strip", **options)
    conv = models.build_model("vit_strip", patch_embed="conv", **options)
    conv.load_state_dict({k: v for k, v in linear.state_dict().items() if not k.startswith("patch_embed")},
                         strict=False)
    with torch.no_grad():   # linear features are (row, column, channel); the conv kernel is (channel, row, column)
        conv.patch_embed.weight.copy_(linear.patch_embed.weight.view(8, 4, 4, 3).permute(0, 3, 1, 2))
        conv.patch_embed.bias.copy_(linear.patch_embed.bias)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(linear(x), conv(x), atol=1e-5)


def test_relu_layers_follow_the_forward_pass() -> None:
    relu_vit = models.build_model("vit", in_channels=3, image_size=8, num_classes=4, patch_size=4, dim=8, depth=2,
                                  heads=2, activation="relu")
    assert [(l.linear, l.relu) for l in find_relu_layers(relu_vit, (3, 8, 8))] == [
        ("blocks.0.mlp.fc1", "blocks.0.mlp.act"), ("blocks.1.mlp.fc1", "blocks.1.mlp.act")]
    gelu_vit = models.build_model("vit", in_channels=3, image_size=8, num_classes=4, patch_size=4, dim=8, depth=1,
                                  heads=2)
    assert find_relu_layers(gelu_vit, (3, 8, 8)) == []
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), shared, nn.Linear(8, 8), shared, nn.Linear(8, 3))
    with pytest.raises(ValueError, match="ReLU module 2 is applied 2 times"):
        find_relu_layers(twice, (1, 4, 4))
    s16 = models.build_model("vit_s16", in_channels=3, image_size=32, num_classes=4, activation="relu")
    assert [l.linear for l in find_relu_layers(s16, (3, 32, 32))] == [f"blocks.{i}.mlp.fc1" for i in range(12)]
    one_relu = models.build_model("vit_strip", in_channels=1, image_size=4, num_classes=3, patch_size=2, dim=8,
                                  depth=1, heads=2, mlp_out_relu=False)
    assert [l.linear for l in find_relu_layers(one_relu, (1, 4, 4))] == ["blocks.0.mlp.fc1"]


# ------------------------------------------------------------------------------------ the quantile, exactly
def test_signed_quantile_matches_torch_quantile_on_the_non_zero_kept_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        weight = torch.randn(4, n, generator=generator)
        if trial % 2:
            weight = torch.round(weight * 2) / 2            # ties and exact zeros
        kept = torch.rand(4, n, generator=generator) > 0.3
        factor = 0.05 if trial % 3 == 0 else float(torch.rand(1, generator=generator).clamp_min(1e-3))
        prune = strip_rows(weight, kept, torch.arange(4), factor)
        for row in range(4):
            live = kept[row] & (weight[row] != 0)
            expected = torch.zeros(n, dtype=torch.bool)
            if live.any():
                expected = live & (weight[row] < torch.quantile(weight[row][live], factor))
            assert torch.equal(prune[row], expected), (trial, row)


def test_hand_counted_rows_zeros_ties_and_interpolation() -> None:
    weight = torch.tensor([[-3.0, -1.0, 0.0, 2.0, -2.0, 5.0, 0.0, 1.0],     # zeros: one kept, one pruned
                           [-1.0, -1.0, -1.0, -2.0, 4.0, 3.0, -1.0, 0.5],   # ties at the threshold
                           [-4.0, -2.6, -2.4, -2.0, 1.0, 3.0, 7.0, 8.0],    # interpolated threshold
                           [-9.0, -8.0, -7.0, 1.0, 2.0, 3.0, 4.0, 5.0]])    # not asked for
    kept = torch.ones_like(weight, dtype=torch.bool)
    kept[0, 6] = False
    prune = strip_rows(weight, kept, torch.tensor([0, 1, 2]), 0.25)
    # row 0: non-zero kept [-3 -2 -1 1 2 5], r = 0.25 * 5 = 1.25, threshold -2 + 0.25 (-1 - -2) = -1.75: cut -3, -2
    assert prune[0].nonzero().flatten().tolist() == [0, 4]
    # row 1: [-2 -1 -1 -1 -1 0.5 3 4], r = 1.75 between two -1: threshold -1, only -2 is strictly below
    assert prune[1].nonzero().flatten().tolist() == [3]
    # row 2: [-4 -2.6 -2.4 -2 1 3 7 8], r = 1.75, threshold -2.6 + 0.75 * 0.2 = -2.45: cut -4 and -2.6, keep -2.4
    assert prune[2].nonzero().flatten().tolist() == [0, 1]
    assert not prune[3].any()


# ------------------------------------------------------------------- planted dead neurons on a tiny ViT
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return models.build_model("vit_strip", in_channels=1, image_size=4, num_classes=3, patch_size=2, dim=8, depth=1,
                              heads=2, mlp_ratio=1.0)


def run_pass(model: nn.Module, request: DecisionPass, batches: list[torch.Tensor]) -> None:
    """What the trainer does for a decision pass on one rank: hooks during the pass only, float64 sums."""
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name: str, probe):  # noqa: ANN001, ANN202
        def hook(module, inputs, output):  # noqa: ANN001, ANN202
            sums[name] = sums.get(name, 0) + probe(output).double()
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n, p)) for n, p in request.probes.items()]
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for handle in handles:
        handle.remove()
    model.train()
    request.decide(sums)


def test_planted_dead_neurons_lose_exactly_the_hand_counted_weights() -> None:
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = StrippingConfig(method="synaptic_stripping", stripping_factor=0.25)
    method = build_method(config, model, optimizer, MethodContext(epochs=3, input_shape=(1, 4, 4)))
    assert isinstance(method, SynapticStripping)
    assert list(method.params) == ["blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"]
    batches = [torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    F.cross_entropy(model(batches[0]), torch.arange(6) % 3).backward()
    optimizer.step()                                         # Adam moments everywhere
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    already = torch.ones(8, 8, dtype=torch.bool)
    already[2, 6] = False
    method.masks.update({"blocks.0.mlp.fc1.weight": already}, optimizer=optimizer)
    with torch.no_grad():    # plant: fc1 neuron 2 and fc2 neuron 5 never fire, every other neuron always does
        fc1.bias.fill_(10.0)
        fc2.bias.fill_(100.0)
        fc1.weight[2] = torch.tensor([-3.0, -1.0, 0.0, 2.0, -2.0, 5.0, 0.0, 1.0]) * 0.1
        fc1.bias[2] = -100.0
        fc2.weight[5] = torch.tensor([-1.0, -1.0, -1.0, -2.0, 4.0, 3.0, -1.0, 0.5]) * 0.1
        fc2.bias[5] = -100.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks_before = {k: v.clone() for k, v in method.masks.items()}

    request = method.decision_pass(0)
    assert request is not None and request.split == "val"
    assert set(request.probes) == {"blocks.0.mlp.act1", "blocks.0.mlp.act2"}
    run_pass(model, request, batches)
    assert not any(m._forward_hooks for m in model.modules())           # hooks lived only during the pass
    method.end_epoch(0)

    changed = {n: (before[n] != model.state_dict()[n]) for n in before}
    assert {n for n, c in changed.items() if c.any()} == {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"}
    # fc1 row 2 (non-zero kept: -.3 -.2 -.1 .1 .2 .5): threshold -0.175, cut columns 0 and 4
    assert changed["blocks.0.mlp.fc1.weight"].nonzero().tolist() == [[2, 0], [2, 4]]
    # fc2 row 5 (-.2 -.1 -.1 -.1 -.1 .05 .3 .4): threshold -0.1, the tied -0.1 survive, cut column 3
    assert changed["blocks.0.mlp.fc2.weight"].nonzero().tolist() == [[5, 3]]
    for name, mask in method.masks.items():
        assert not (mask & ~masks_before[name]).any(), "a mask grew"
        assert (model.state_dict()[name][~mask] == 0).all()
        state = optimizer.state[method.params[name]]
        assert (state["exp_avg"][~mask] == 0).all() and (state["exp_avg_sq"][~mask] == 0).all()
    assert not method.masks["blocks.0.mlp.fc1.weight"][2, 6]                     # the old cut stays
    assert method.metrics() == {"stripped": 3.0, "stripped_total": 3.0, "strips": 1.0}

    fresh = build_method(config, tiny_vit(), None, MethodContext(epochs=3, input_shape=(1, 4, 4)))
    fresh.load_state_dict(method.state_dict())
    assert fresh.state_dict() == method.state_dict() == {"stripped": [[0, 3]]}


def test_only_stripping_epochs_ask_for_a_pass_and_never_the_last() -> None:
    context = MethodContext(epochs=5, input_shape=(1, 4, 4))
    method = build_method(StrippingConfig(method="synaptic_stripping", stripping_frequency=2), tiny_vit(), None,
                          context)
    assert [method.decision_pass(e) is not None for e in range(5)] == [False, True, False, True, False]
    last = build_method(StrippingConfig(method="synaptic_stripping"), tiny_vit(), None, context)
    assert [last.decision_pass(e) is not None for e in range(5)] == [True, True, True, True, False]


def test_relu_sums_reduce_to_one_vector_per_layer_and_stay_exact() -> None:
    out = torch.zeros(3, 5, 4)
    out[1, 2, 0] = 1e-30
    sums = relu_sums(out)
    assert sums.shape == (4,) and sums[0] > 0 and (sums[1:] == 0).all()
    half = torch.full((2, 3000, 2), 60000.0, dtype=torch.float16)
    assert torch.isfinite(relu_sums(half)).all() and relu_sums(half).dtype == torch.float32


# ---------------------------------------------------------------------------------- config errors, one line
@pytest.mark.parametrize(("overrides", "message"), [
    (["sparsity.method=synaptic_stripping"], "sparsity.split val needs a held-out split: set data.val_fraction"),
    (["monitor.dead_neurons=val"], "monitor.dead_neurons val needs a held-out split"),
    (["sparsity.method=synaptic_stripping", "sparsity.stripping_factor=0", "data.val_fraction=0.1"],
     "stripping_factor must be in (0, 1]"),
    (["sparsity.method=synaptic_stripping", "sparsity.stripping_frequency=3", "data.val_fraction=0.1",
      "train.epochs=3"], "sparsity.stripping_frequency=3 leaves no stripping before the last epoch"),
    (["monitor.dead_neurons=sometimes"], "monitor.dead_neurons must be one of 'off', 'train', 'val', 'test'"),
])
def test_bad_settings_fail_before_any_worker_in_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.name=vit_strip", *overrides])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_monitoring_a_model_without_relu_layers_fails_in_one_line(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=conv", "monitor.dead_neurons=test", f"output_dir={tmp_path}",
                             "monitor.tensorboard=false", "train.device=cpu"])
    env = DistEnv.from_environ()
    with pytest.raises(ValueError, match="no Linear of model conv feeds an nn.ReLU module"):
        Trainer(cfg, build_backend(cfg.parallel, env, pick_device("cpu", env), "fp32"))


# ------------------------------------------------------------------------- the trainer: passes and curves
def test_one_shared_hook_per_relu_when_method_and_monitor_read_the_same_split(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY_RUN, f"output_dir={tmp_path}", "train.epochs=2", "monitor.tensorboard=false",
                             "sparsity.method=synaptic_stripping"])
    env = DistEnv.from_environ()
    trainer = Trainer(cfg, build_backend(cfg.parallel, env, pick_device("cpu", env), "fp32"))
    relu = trainer.model.get_submodule("blocks.0.mlp.act1")
    counted: list[int] = []
    original = trainer._attach_probes

    def attach(probes, sums):  # noqa: ANN001, ANN202
        handles = original(probes, sums)
        counted.append(len(relu._forward_hooks))
        return handles

    trainer._attach_probes = attach
    trainer.fit()
    trainer.close()
    assert counted == [1, 1]          # epoch 1: the method's and the monitor's val passes share one hook on act1;
    assert not relu._forward_hooks    # epoch 2 (the last): the monitor's alone; hooks gone after each pass


def _history(run: Path) -> list[dict]:
    return json.loads((run / "summary.json").read_text())["neurons"]["history"]


def test_runs_with_and_without_stripping_report_the_same_curves(tmp_path: Path) -> None:
    common = [*TINY_RUN, f"output_dir={tmp_path}", "train.epochs=3", "optim.lr=0.05"]
    strip = train(load_config(None, [*common, "name=strip", "sparsity.method=synaptic_stripping",
                                     "sparsity.stripping_factor=0.5"]))
    plain = train(load_config(None, [*common, "name=plain", "sparsity.method=dense"]))
    for run, summary in (("strip", strip), ("plain", plain)):
        neurons = summary["neurons"]
        assert neurons["split"] == "val" and list(neurons["layers"]) == [
            "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
        history = _history(tmp_path / run)
        assert [h["epoch"] for h in history] == [1, 2, 3]
        for h in history:
            assert h["dead_total"] == sum(h["dead"].values()) and h["neurons_total"] == 2 * (64 + 16)
            assert h["params"] == 4 * 16 * 64 and h["active_params"] <= h["params"]
        events = EventAccumulator(str(tmp_path / run / "tensorboard"))
        events.Reload()
        tags = events.Tags()["scalars"]
        for tag, key in (("dead_total", "dead_total"), ("active_params", "active_params")):
            assert [e.value for e in events.Scalars(f"neurons/{tag}")] == [float(h[key]) for h in history]
        assert [e.value for e in events.Scalars("neurons/dead/blocks.1.mlp.fc2")] == [
            float(h["dead"]["blocks.1.mlp.fc2"]) for h in history]
        assert ("method/stripped" in tags) == (run == "strip")
    plain_first, strip_first = _history(tmp_path / "plain")[0], _history(tmp_path / "strip")[0]
    assert plain_first["dead"] == strip_first["dead"]         # same run until the first strip
    stripped = [h["method"]["stripped"] for h in _history(tmp_path / "strip")]
    cut = sum(layer["numel"] - layer["kept"] for layer in strip["layers"].values())
    assert stripped[-1] == 0 and sum(stripped) == cut > 0
    # observed with this seed: without stripping the dead count grows (10, 14, 15), with it it falls (10, 5, 3)
    assert _history(tmp_path / "strip")[-1]["dead_total"] < _history(tmp_path / "plain")[-1]["dead_total"]
    # active weights count live rows only, minus what stripping cut (plain: live rows x fan-in)
    for h in _history(tmp_path / "plain"):
        assert h["active_params"] == sum((features - h["dead"][name]) * (16 if name.endswith("fc1") else 64)
                                         for name, features in plain["neurons"]["layers"].items())


def test_the_history_and_the_strip_counts_survive_a_resume(tmp_path: Path) -> None:
    common = [*TINY_RUN, f"output_dir={tmp_path}", "optim.lr=0.05", "sparsity.method=synaptic_stripping",
              "sparsity.stripping_factor=0.5"]
    straight = train(load_config(None, [*common, "name=straight", "train.epochs=3"]))
    class StopAfterTwo:
        def on_epoch_end(self, epoch: int, metrics: object) -> bool:
            return epoch == 1

    train(load_config(None, [*common, "name=resumed", "train.epochs=3"]), callbacks=[StopAfterTwo()])
    resumed = train(load_config(None, [*common, "name=resumed", "train.epochs=3", "resume=auto"]))
    assert _history(tmp_path / "resumed") == _history(tmp_path / "straight")
    assert resumed["method_metrics"] == straight["method_metrics"]
    assert resumed["layers"] == straight["layers"]


def test_a_model_with_nothing_to_strip_or_monitor_is_refused_before_any_worker_starts() -> None:
    from engine.config import ConfigError
    from launcher.common import check

    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    with pytest.raises(ConfigError, match="no prunable Linear of this model feeds an nn.ReLU"):
        check(quickstart, ["sparsity={method: synaptic_stripping, split: test}"])
    with pytest.raises(ConfigError, match="monitor.dead_neurons=test but no Linear of model conv"):
        check(quickstart, ["monitor.dead_neurons=test"])
    check(quickstart, ["model={name: vit_strip, options: {depth: 1, dim: 32, heads: 2}}",
                       "sparsity={method: synaptic_stripping, split: test}"])   # a ReLU ViT passes, weightless

"""HashedNet: the tying by hand on tiny layers, gradient sums and rescale, determinism, config errors, digits runs."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from engine.checkpoint import load_state
from engine.config import ConfigError
from engine.backends import Backend, DistEnv
from engine.run_config import load_config
from engine.trainer import train
from pruning.agreement import seeded_generator
from pruning.methods import MethodContext, build_method
from pruning.methods.hashed import HashedNet, HashedNetConfig, balanced_assignment, repeat_counts  # registers it
from pruning.selection import layer_counts

REPO = Path(__file__).resolve().parents[1]


def tie(model: nn.Module, density: float = 0.5, seed: int = 0, **options: object) -> tuple[nn.Module, HashedNet]:
    """prepare_model, then the method, as the trainer does (the optimizer comes in between there)."""
    cfg = HashedNetConfig(method="hashednet", density=density, **options)
    context = MethodContext(seed=seed)
    model = HashedNet.prepare_model(cfg, model, context)
    method = build_method(cfg, model, None, context)
    assert isinstance(method, HashedNet)
    return model, method


def gathered(method: HashedNet, name: str) -> torch.Tensor:
    """bank[assignment] by plain indexing (not the parametrization's index_select), shaped like the weight."""
    bank, tied = method.params[name], method.ties[name]
    return bank.detach().reshape(-1)[tied.assignment.long()].view(tied.shape)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 3))


# ------------------------------------------------------------------ the tying, by hand
def test_repeat_counts_and_balanced_assignment_by_hand() -> None:
    assert repeat_counts(7, 3).tolist() == [3, 2, 2]
    assert repeat_counts(12, 6).tolist() == [2] * 6
    assert repeat_counts(5, 5).tolist() == [1] * 5
    generator = seeded_generator(3, 0, "x")
    perm = torch.randperm(10, generator=seeded_generator(3, 0, "x")).tolist()
    assignment, sources = balanced_assignment(10, 4, generator)
    assert assignment.tolist() == [p % 4 for p in perm]
    assert sources.tolist() == [perm.index(j) for j in range(4)]
    assert torch.bincount(assignment.long(), minlength=4).tolist() == repeat_counts(10, 4).tolist() == [3, 3, 2, 2]


def test_tiny_linear_weight_is_the_bank_gathered() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    initial, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer, method = tie(layer, density=0.5)                  # N = 12 weights, K = 6 bank entries
    bank, tied = method.params["weight"], method.ties["weight"]
    assert list(method.params) == ["weight"] and method.masks is None
    assert bank.shape == (6, 1) and isinstance(bank, nn.Parameter)
    assert [name for name, _ in layer.named_parameters()] == ["bias", "parametrizations.weight.original"]
    perm = torch.randperm(12, generator=seeded_generator(0, 0, "hashednet/assignment/weight"))
    assert tied.assignment.tolist() == (perm % 6).tolist()   # the documented seeding rule
    weight = layer.weight
    assert weight.shape == (4, 3)
    assert torch.equal(weight, bank.detach().view(-1)[(perm % 6)].view(4, 3))
    assert torch.equal(weight, gathered(method, "weight"))
    # the bank starts from the layer's own weights at the positions with perm < K, which keep their value
    sources = [int((perm == j).nonzero()) for j in range(6)]
    assert torch.equal(bank.detach().view(-1), initial.view(-1)[sources])
    assert torch.equal(weight.detach().view(-1)[sources], initial.view(-1)[sources])
    assert torch.equal(layer.bias, bias)
    assert torch.bincount(tied.assignment.long()).tolist() == [2] * 6
    stats = method.layer_stats()
    assert [(s.name, s.numel, s.kept) for s in stats] == [("weight", 12, 6)]
    assert method.layer_targets() == {"weight": 0.5} and method.metrics()["hashednet/mean_repeats"] == 2.0


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_bank_sizes_and_balanced_repeats(distribution: str) -> None:
    model, method = tie(mlp(), density=0.1, distribution=distribution)
    shapes = {"0.weight": (30, 20), "2.weight": (10, 30), "4.weight": (3, 10)}
    total = sum(math.prod(s) for s in shapes.values())                                       # 930
    expected = layer_counts({n: torch.Size(s) for n, s in shapes.items()}, 0.1, distribution)
    assert {n: b.numel() for n, b in method.params.items()} == expected
    assert sum(b.numel() for b in method.params.values()) == round(0.1 * total) == 93
    for name, shape in shapes.items():
        n, k = math.prod(shape), expected[name]
        counts = torch.bincount(method.ties[name].assignment.long(), minlength=k)
        assert int(counts.min()) == n // k and int(counts.max()) == math.ceil(n / k), name
        assert counts.tolist() == method.ties[name].counts.view(-1).long().tolist()
        assert torch.equal(model.get_submodule(name[:-len(".weight")]).weight, gathered(method, name))
    assert [s.numel for s in method.layer_stats()] == [600, 300, 30]
    assert sum(p.numel() for p in model.parameters()) == 93 + 30 + 10 + 3                    # banks + biases
    if distribution != "uniform":
        assert expected["4.weight"] / 30 > expected["0.weight"] / 600                        # small layers denser


def test_conv_weight_is_tied_in_four_dimensions() -> None:
    torch.manual_seed(0)
    model, method = tie(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)), density=0.25)
    conv = model[0]
    assert conv.weight.shape == (4, 2, 3, 3) and method.params["0.weight"].numel() == 18
    assert torch.equal(conv.weight, gathered(method, "0.weight"))
    assert model(torch.randn(2, 2, 6, 6)).shape == (2, 5)


def test_assigning_a_weight_projects_it_onto_the_bank() -> None:
    """right_inverse: each bank entry becomes the mean of the weights tied to it."""
    layer, method = tie(nn.Linear(3, 4, bias=False), density=0.5)
    dense = torch.arange(12, dtype=torch.float32).view(4, 3)
    layer.weight = dense
    assignment = method.ties["weight"].assignment.long()
    means = torch.stack([dense.view(-1)[assignment == j].mean() for j in range(6)])
    torch.testing.assert_close(method.params["weight"].detach().view(-1), means)
    assert method.params["weight"] is layer.parametrizations.weight.original     # the same parameter, new values


def test_an_empty_bank_and_an_unprepared_model_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^sparsity\.density 0\.05 leaves weight \(4 weights\) an empty bank"):
        tie(nn.Linear(2, 2), density=0.05)
    with pytest.raises(RuntimeError, match="prepare_model must convert it"):
        build_method(HashedNetConfig(method="hashednet"), nn.Linear(3, 4), None, MethodContext())


def test_ddp_is_told_to_skip_the_assignment_buffers() -> None:
    model, _ = tie(mlp(), density=0.2)
    buffers = {name for name, _ in model.named_buffers()}
    assert set(model._ddp_params_and_buffers_to_ignore) == buffers
    assert len(buffers) == 6 and all(b.endswith((".assignment", ".counts")) for b in buffers)


# ------------------------------------------------------------------ gradients
def test_bank_gradient_is_the_scatter_add_of_the_weight_gradient() -> None:
    base = mlp()
    dense = copy.deepcopy(base)
    model, method = tie(base, density=0.2)
    with torch.no_grad():
        for name in method.params:
            dense.get_submodule(name[:-len(".weight")]).weight.copy_(gathered(method, name))
    x, y = torch.randn(16, 20), torch.randint(0, 3, (16,))
    out_tied, out_dense = model(x), dense(x)
    assert torch.equal(out_tied, out_dense)
    nn.functional.cross_entropy(out_tied, y).backward()
    nn.functional.cross_entropy(out_dense, y).backward()
    for name, bank in method.params.items():
        dense_grad = dense.get_submodule(name[:-len(".weight")]).weight.grad
        expected = torch.zeros(bank.numel()).index_add_(0, method.ties[name].assignment.long(), dense_grad.view(-1))
        torch.testing.assert_close(bank.grad.view(-1), expected, rtol=1e-6, atol=1e-7)
        assert bank.grad.abs().sum() > 0
    assert torch.equal(model[0].bias.grad, dense[0].bias.grad)


@pytest.mark.parametrize("rescale", [False, True])
def test_one_sgd_step_with_and_without_rescale(rescale: bool) -> None:
    """lr 1, no momentum, no decay: bank - sum (plain) or bank - sum / count (rescaled in before_step)."""
    torch.manual_seed(1)
    layer = nn.Linear(5, 3, bias=False)
    cfg = HashedNetConfig(method="hashednet", density=0.4, grad_rescale=rescale)   # N = 15, K = 6: 3 and 2 repeats
    context = MethodContext()
    layer = HashedNet.prepare_model(cfg, layer, context)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0, momentum=0.0, weight_decay=0.0)
    method = build_method(cfg, layer, optimizer, context)
    backend = Backend(DistEnv(), torch.device("cpu"))
    module, optimizer = backend.prepare(layer, optimizer, micro_batch_size=4, grad_accum_steps=1, clip_grad_norm=None)
    bank = method.params["weight"]
    before = bank.detach().clone()
    module(torch.randn(4, 5)).pow(2).sum().backward()
    summed = bank.grad.detach().clone()
    counts = torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0, 2.0]).view(6, 1)
    assert torch.equal(method.ties["weight"].counts, counts)
    seen: list[torch.Tensor] = []

    def hook() -> None:                       # what the optimizer will see: the gradient right after before_step
        method.before_step(0)
        seen.append(bank.grad.detach().clone())

    backend.step(optimizer, hook)
    expected_grad = summed / counts if rescale else summed
    assert torch.equal(seen[0], expected_grad)
    assert torch.equal(bank.detach(), before - expected_grad)
    assert not torch.equal(summed / counts, summed)           # the two cases differ
    assert torch.equal(layer.weight, gathered(method, "weight"))


# ------------------------------------------------------------------ determinism and state
def test_same_seed_same_model_other_seed_differs() -> None:
    base = mlp()
    _, first = tie(copy.deepcopy(base), density=0.2, seed=5)
    _, again = tie(copy.deepcopy(base), density=0.2, seed=5)
    _, other = tie(copy.deepcopy(base), density=0.2, seed=6)
    for name in first.params:
        assert torch.equal(first.ties[name].assignment, again.ties[name].assignment)
        assert torch.equal(first.params[name], again.params[name])
        assert not torch.equal(first.ties[name].assignment, other.ties[name].assignment)
        assert not torch.equal(first.params[name], other.params[name])
    assert first.checksum == again.checksum != other.checksum
    again.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="resume with the same seed and sparsity settings"):
        other.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="resume with the same seed"):
        first.load_state_dict({"masks": None})


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(("overrides", "message"), [
    (["sparsity.density=1.0"], r"^sparsity\.density must be in \(0, 1\)"),
    (["sparsity.density=0"], r"^sparsity\.density must be in \(0, 1\)"),
    (["sparsity.distribution=gaussian"], r"^sparsity\.distribution must be one of"),
    (["sparsity.grad_rescale=true", "parallel.backend=deepspeed", "parallel.zero_stage=1"],
     r"^sparsity\.grad_rescale .*ZeRO stage 1.*set sparsity\.grad_rescale=false, parallel\.zero_stage=0"),
])
def test_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["sparsity.method=hashednet", *overrides])


def test_config_accepts_what_works() -> None:
    cfg = load_config(None, ["sparsity.method=hashednet", "sparsity.grad_rescale=true", "parallel.backend=deepspeed",
                             "parallel.zero_stage=0"])
    assert isinstance(cfg.sparsity, HashedNetConfig) and cfg.sparsity.grad_rescale
    cfg = load_config(None, ["sparsity.method=hashednet", "parallel.backend=deepspeed", "parallel.zero_stage=2",
                             "sparsity.distribution=erk"])
    assert (cfg.sparsity.density, cfg.sparsity.distribution, cfg.sparsity.grad_rescale) == (0.1, "erk", False)
    with pytest.raises(ValueError, match="^distribution must be uniform, er or erk"):
        HashedNetConfig(distribution="gaussian")  # type: ignore[arg-type]


# ------------------------------------------------------------------ end to end on digits
DIGITS = ["data.name=digits", "model.name=mlp", "model.options.hidden=[64,32]", "sparsity.method=hashednet",
          "sparsity.density=0.1", "monitor.progress=false", "monitor.tensorboard=false"]
MLP_LAYERS = {"features.0.weight": (64, 64), "features.2.weight": (32, 64), "classifier.weight": (10, 32)}


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))


def test_digits_trains_resumes_and_stays_tied(tmp_path: Path) -> None:
    """3 epochs, then resume=auto to 5, equals 5 straight (a constant lr: the schedule does not depend on the end)."""
    constant = [*DIGITS, "lr_schedule.name=constant", f"output_dir={tmp_path}"]
    first = train(load_config(None, [*constant, "train.epochs=3", "name=tied"]))
    assert first["test_acc"] > 0.75, f"hashednet reached only {first['test_acc']:.3f}"   # 0.886 (seeds 0-5: 0.78+)
    kept = {name: layer["kept"] for name, layer in first["layers"].items()}
    assert sum(kept.values()) == round(0.1 * 6464) == 646
    assert {name: layer["numel"] for name, layer in first["layers"].items()} == {
        name: math.prod(shape) for name, shape in MLP_LAYERS.items()}
    assert first["params_total"] == 646 + 64 + 32 + 10                         # banks and biases, no dense weights
    assert first["density"] == pytest.approx(646 / 6464)

    resumed = train(load_config(None, [*constant, "train.epochs=5", "name=tied", "resume=auto"]))
    straight = train(load_config(None, [*constant, "train.epochs=5", "name=straight"]))
    assert resumed["run_dir"] == first["run_dir"] and resumed["epochs"] == 5 and resumed["steps"] == 60
    state = load_state(str(_checkpoints(tmp_path / "tied")[-1]))
    reference = load_state(str(_checkpoints(tmp_path / "straight")[-1]))
    assert state["step"] == 60
    for key, tensor in reference["model"].items():                          # resumed on the same curve
        assert torch.equal(tensor, state["model"][key]), key
    assert resumed["test_acc"] == straight["test_acc"] > 0.8                   # measured 0.900

    # the checkpoint holds banks only; a model rebuilt with the same seed gathers its weights from them
    for name, shape in MLP_LAYERS.items():
        assert name not in state["model"]
        bank = state["model"][name.replace(".weight", ".parametrizations.weight.original")]
        assert bank.shape == (kept[name], 1)
    cfg = load_config(None, [*DIGITS, f"output_dir={tmp_path}"])
    model = models.build_model("mlp", in_channels=1, image_size=8, num_classes=10, hidden=[64, 32])
    context = MethodContext(seed=cfg.seed)
    model = HashedNet.prepare_model(cfg.sparsity, model, context)
    model.load_state_dict(state["model"])
    method = build_method(cfg.sparsity, model, None, context)
    method.load_state_dict(state["method"])                                   # same assignments: accepted
    for name, shape in MLP_LAYERS.items():
        weight = model.get_submodule(name[:-len(".weight")]).weight
        assert weight.shape == shape and torch.equal(weight, gathered(method, name))
        assert torch.equal(method.params[name], state["model"][name.replace(".weight",
                                                                             ".parametrizations.weight.original")])


def test_resume_with_another_seed_is_refused(tmp_path: Path) -> None:
    train(load_config(None, [*DIGITS, "train.epochs=1", f"output_dir={tmp_path}", "name=seeded"]))
    with pytest.raises(ValueError, match="other settings \\(seed 0 -> 1"):     # the run's config check comes first
        train(load_config(None, [*DIGITS, "train.epochs=2", f"output_dir={tmp_path}", "name=seeded", "seed=1",
                                 "resume=auto"]))


def test_conv_model_on_digits(tmp_path: Path) -> None:
    summary = train(load_config(None, ["data.name=digits", "model.name=conv", "sparsity.method=hashednet",
                                       "sparsity.density=0.2", "train.epochs=2",
                                       "monitor.progress=false", "monitor.tensorboard=false",
                                       f"output_dir={tmp_path}"]))
    layers = summary["layers"]
    assert layers["features.0.weight"]["numel"] == 32 * 1 * 3 * 3                       # a 4-D conv weight
    assert sum(layer["kept"] for layer in layers.values()) == round(0.2 * sum(
        layer["numel"] for layer in layers.values()))
    assert summary["test_acc"] > 0.5, f"conv hashednet reached only {summary['test_acc']:.3f}"   # measured 0.875
    state = load_state(str(_checkpoints(Path(summary["run_dir"]))[-1]))
    bank = state["model"]["features.0.parametrizations.weight.original"]
    assert bank.shape == (layers["features.0.weight"]["kept"], 1)


# ------------------------------------------------------------------ two ranks
PROBE = '''
import json, sys
import torch
import pruning.methods.hashed  # noqa: F401
from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer
out, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config(None, overrides)
env = DistEnv.from_environ()
backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
trainer = Trainer(cfg, backend)
summary = trainer.fit()
synced = getattr(trainer.module, "named_module_buffers", None)      # DDP's buffers broadcast before each forward
torch.save(trainer.model.state_dict(), f"{out}/rank{env.rank}.pt")
with open(f"{out}/rank{env.rank}.json", "w") as handle:
    json.dump({"synced": None if synced is None else sorted(synced), "steps": summary["steps"],
               "checksum": trainer.method.checksum}, handle)
backend.barrier()
backend.shutdown()
'''


def test_two_ddp_ranks_build_and_train_the_same_tied_model(tmp_path: Path) -> None:
    """Every rank derives the same assignments from the seed, DDP broadcasts none of them, the rescale runs on
    reduced gradients: both ranks end with the same banks."""
    (tmp_path / "probe.py").write_text(PROBE)
    overrides = [*DIGITS, "sparsity.grad_rescale=true", "train.epochs=2", "parallel.backend=ddp", "train.device=cpu",
                 f"output_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "probe.py"), str(tmp_path), *overrides], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert facts[0]["steps"] == 12 and facts[0]["synced"] in (None, [])
    assert facts[0]["checksum"] == facts[1]["checksum"]      # each rank built the same assignments on its own
    assert states[0].keys() == states[1].keys()
    for key, tensor in states[0].items():
        assert torch.equal(tensor, states[1][key]), f"{key} differs across ranks"
    assert states[0]["features.0.parametrizations.weight.original"].shape == (409, 1)

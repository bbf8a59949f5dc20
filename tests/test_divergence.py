"""Divergence: a non-finite loss stops the run in one line with exit code 3 and keeps every finite checkpoint;
pruned weights stay exactly zero whatever the gradients hold; non-finite config numbers are refused; JSON files stay
JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import engine.trainer as trainer_module
from common import jsonsafe
from engine.backends import DistEnv, build_backend, pick_device
from engine.checkpoint import META_SUFFIX, Checkpointer, load_state
from engine.config import ConfigError
from engine.errors import EXIT_DIVERGED, Diverged
from engine.run_config import load_config
from engine.trainer import Trainer, train
from pruning.masks import MaskSet

SMALL = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[16]",
         "monitor.progress=false", "monitor.tensorboard=false", "train.max_steps_per_epoch=6", "optim.lr=0.05"]
MAGNITUDE = ["sparsity.method=magnitude", "sparsity.density=0.3", "sparsity.scope=layer"]


def poison_loss(monkeypatch: pytest.MonkeyPatch, train_from: int | None = None,
                eval_value: float | None = None) -> None:
    """Training losses turn NaN from micro-batch ``train_from`` (1-based) on, through the gradient too; evaluation
    losses become ``eval_value``. The real loss is used otherwise."""
    real = trainer_module.build_loss
    calls = {"train": 0}

    def build(name: str, *args: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        loss = real(name, *args)
        training = len(args) > 0          # the trainer builds the training loss with label smoothing given

        def wrapped(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            value = loss(outputs, targets)
            if training:
                calls["train"] += 1
                if train_from is not None and calls["train"] >= train_from:
                    return value * float("nan")
            elif eval_value is not None:
                return value * 0 + eval_value
            return value

        return wrapped

    monkeypatch.setattr(trainer_module, "build_loss", build)


# ------------------------------------------------------------------------------------------------ stopping


def test_nan_loss_stops_the_run_and_keeps_every_finite_checkpoint(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """keep=1, NaN from step 14 (epoch 3 of 6-step epochs): the run stops there naming step, loss and lr; the
    epoch-2 checkpoint is the newest and stays; nothing non-finite is written; no summary claims a finished run."""
    poison_loss(monkeypatch, train_from=14)
    with pytest.raises(Diverged) as info:
        train(load_config(None, [*SMALL, *MAGNITUDE, f"output_dir={tmp_path}", "name=nan", "train.epochs=5",
                                 "checkpoint.keep=1", "lr_schedule.name=constant"]))
    message = str(info.value)
    assert info.value.exit_code == EXIT_DIVERGED == 3
    assert "\n" not in message
    assert message.startswith("diverged: loss nan at step 14 (epoch 3), lr 0.05; kept checkpoints: "
                              "ckpt-e0002-s00000012.pt")
    saver = Checkpointer(str(tmp_path / "nan" / "checkpoints"))
    assert [u.rsplit("/", 1)[-1] for u in saver.checkpoints()] == ["ckpt-e0002-s00000012.pt"]
    state = load_state(saver.checkpoints()[0])
    meta = json.loads(Path(saver.checkpoints()[0] + META_SUFFIX).read_text())
    assert meta["finite"] is True and state["step"] == 12
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_rigl_divergence_is_a_divergence_not_a_scorer_traceback(tmp_path: Path) -> None:
    with pytest.raises(Diverged, match=r"^diverged: loss nan at step \d+ \(epoch 1\), lr "):
        train(load_config(None, [*SMALL, f"output_dir={tmp_path}", "name=rigl", "train.epochs=2",
                                 "sparsity.method=rigl", "sparsity.density=0.2", "sparsity.period=2",
                                 "optim.lr=1e12"]))


def test_an_update_that_fails_on_nan_weights_is_reported_as_divergence(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A method's scorer that raises on NaN (as RigL's did) runs before the mask update's own check: the error is
    still reported as the divergence that caused it, with the scorer's error kept as the cause."""
    from pruning.methods import dst

    def strict(self: Any, step: int, grads: Any) -> dict:
        if not all(bool(torch.isfinite(p).all()) for p in self.params.values()):
            raise ValueError("scores are not finite")
        return real(self, step, grads)

    real = dst.SET.new_masks
    monkeypatch.setattr(dst.SET, "new_masks", strict)
    poison_loss(monkeypatch, train_from=3)
    with pytest.raises(Diverged, match=r"^diverged: loss nan at step 3 \(epoch 1\)") as info:
        train(load_config(None, [*SMALL, f"output_dir={tmp_path}", "name=set", "train.epochs=1",
                                 "sparsity.method=set", "sparsity.density=0.2", "sparsity.period=4",
                                 "monitor.log_every_steps=100"]))
    assert isinstance(info.value.__cause__, ValueError)


def test_an_unrelated_error_is_not_called_divergence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pruning.methods import dst

    def broken(self: Any, step: int, grads: Any) -> dict:
        raise ValueError("a real bug")

    monkeypatch.setattr(dst.SET, "new_masks", broken)
    with pytest.raises(ValueError, match="a real bug"):
        train(load_config(None, [*SMALL, f"output_dir={tmp_path}", "name=bug", "train.epochs=1",
                                 "sparsity.method=set", "sparsity.density=0.2", "sparsity.period=4"]))


def test_weights_gone_bad_with_a_finite_loss_never_reach_a_checkpoint(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step of an epoch makes the weights NaN while its loss was finite: the checkpoint gate sees it."""
    real_step = trainer_module.Trainer._train_epoch

    def spoil(self: Trainer) -> dict:
        out = real_step(self)
        if self.epoch == 1:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer_module.Trainer, "_train_epoch", spoil)
    with pytest.raises(Diverged, match="became non-finite by step 12 .* while the loss stayed finite"):
        train(load_config(None, [*SMALL, *MAGNITUDE, f"output_dir={tmp_path}", "name=w", "train.epochs=3",
                                 "train.eval_every_epochs=5"]))
    names = [u.rsplit("/", 1)[-1] for u in Checkpointer(str(tmp_path / "w" / "checkpoints")).checkpoints()]
    assert names == ["ckpt-e0001-s00000006.pt"]


def test_clipping_with_nan_gradients_leaves_pruned_weights_exactly_zero(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN gradient norm makes clipping multiply every gradient by NaN, pruned ones included: the trainer re-zeros
    them when it stops, so the model it leaves holds exact zeros where the masks prune."""
    poison_loss(monkeypatch, train_from=2)
    cfg = load_config(None, [*SMALL, *MAGNITUDE, f"output_dir={tmp_path}", "name=clip", "train.epochs=1",
                             "train.clip_grad_norm=1.0"])
    env = DistEnv.from_environ()
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    trainer = Trainer(cfg, backend)
    try:
        with pytest.raises(Diverged, match="loss nan at step 2"):
            trainer.fit()
        for name, mask in trainer.method.masks.items():
            weight = trainer.method.params[name].detach()
            assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name
            assert torch.isnan(weight[mask]).all(), name     # the kept ones did go bad
    finally:
        trainer.close()
        backend.shutdown()


# ------------------------------------------------------------------------------------------------ exact masking


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pruned_weights_stay_exactly_zero_with_nan_gradients(dtype: torch.dtype, optimizer: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)
    model[0].to(memory_format=torch.channels_last)
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    masks = MaskSet(params)
    masks.update({name: torch.rand(p.shape) < 0.4 for name, p in params.items()})
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01))
    for round_ in range(3):
        patterns = {}
        for param in model.parameters():
            pattern = torch.arange(param.numel()).reshape(param.shape) % 3
            bad = torch.full_like(param, float("inf") if round_ else -float("inf"))
            grad = torch.where(pattern == 0, torch.full_like(param, float("nan")),
                               torch.where(pattern == 1, bad, torch.randn_like(param)))
            param.grad = grad.contiguous(memory_format=torch.channels_last) if param.dim() == 4 else grad
            patterns[param] = pattern
        masks.mask_grads_()
        for name, mask in masks.items():
            grad = params[name].grad
            assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), name      # exact +0.0
            assert not torch.signbit(grad[~mask]).any()
            assert torch.isnan(grad[mask & (patterns[params[name]] == 0)]).all()     # kept NaN stays visible
        opt.step()
        for name, mask in masks.items():
            weight = params[name].detach()
            assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), (name, round_)


def test_mask_changes_reach_the_exact_gradient_masks() -> None:
    layer = nn.Linear(4, 2)
    masks = MaskSet({"weight": layer.weight})
    masks.update({"weight": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)})
    layer.weight.grad = torch.full((2, 4), float("nan"))
    masks.mask_grads_()
    assert torch.equal(torch.isnan(layer.weight.grad), masks["weight"])
    masks.update({"weight": torch.ones(2, 4, dtype=torch.bool)})     # dense again: no masking at all
    layer.weight.grad = torch.full((2, 4), 2.0)
    masks.mask_grads_()
    assert torch.equal(layer.weight.grad, torch.full((2, 4), 2.0))


# ------------------------------------------------------------------------------------------------ config and JSON


@pytest.mark.parametrize("override", ["optim.lr=.nan", "optim.lr=.inf", "optim.lr=-.inf", "optim.lr=nan",
                                      "train.clip_grad_norm=.inf", "data.options.noise=.nan"])
def test_non_finite_config_numbers_are_refused(override: str) -> None:
    key, value = override.split("=")
    extra = ["data.name=synthetic"] if key.startswith("data.options") else []
    with pytest.raises(ConfigError if not extra else ValueError) as info:
        load_config(None, [*extra, override])
    message = str(info.value)
    assert "\n" not in message and "must be a finite number" in message and key.rsplit(".", 1)[-1] in message


def test_non_finite_lr_on_the_command_line_exits_2(capsys: pytest.CaptureFixture) -> None:
    from launcher.cli import main

    assert main(["train", "optim.lr=.inf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "config error: optim.lr must be a finite number, got inf"


def test_json_helper_writes_null_for_non_finite_numbers() -> None:
    text = jsonsafe.dumps({"loss": math.nan, "curve": [1.0, math.inf, -math.inf], "n": 3, "t": torch.tensor(2.5)})
    assert json.loads(text, parse_constant=lambda word: pytest.fail(f"not JSON: {word}")) == {
        "loss": None, "curve": [1.0, None, None], "n": 3, "t": 2.5}


def test_summary_json_stays_valid_with_a_non_finite_test_loss(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    poison_loss(monkeypatch, eval_value=float("inf"))
    summary = train(load_config(None, [*SMALL, *MAGNITUDE, f"output_dir={tmp_path}", "name=inf",
                                       "train.epochs=1", "train.max_steps_per_epoch=2"]))
    assert summary["test_loss"] == math.inf
    text = (tmp_path / "inf" / "summary.json").read_text()
    on_disk = json.loads(text, parse_constant=lambda word: pytest.fail(f"summary.json holds {word}"))
    assert on_disk["test_loss"] is None and on_disk["steps"] == 2


def test_launcher_prints_one_line_and_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    from launcher.cli import main

    poison_loss(monkeypatch, train_from=2)
    code = main(["train", *SMALL, *MAGNITUDE, f"output_dir={tmp_path}", "name=cli", "train.epochs=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3
    assert err == [err[-1]] and err[-1].startswith("diverged: loss nan at step 2 (epoch 1), lr ")


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_rank_sees_nan(tmp_path: Path) -> None:
    """DDP over gloo: only rank 1's loss goes NaN; both ranks stop with the same line (its step), neither hangs."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    overrides = [*SMALL, *MAGNITUDE, f"output_dir={tmp_path}", "name=ddp", "train.epochs=2",
                 "monitor.log_every_steps=100", "data.batch_size=32"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/divergence_probe.py", str(tmp_path), *overrides], cwd=repo, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                         "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert lines[0] == lines[1]
    assert lines[0].startswith("Diverged diverged: loss nan at step 3 (epoch 1)"), lines[0]

"""Iterative magnitude pruning: one level's prune and rewind by hand, and the level driver end to end on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import engine.lottery
from engine.config import ConfigError
from engine.lottery import run_lottery
from engine.run_config import load_config
from launcher.cli import main
from pruning.methods import MethodContext, build_method
from pruning.methods.lottery import LotteryConfig


def two_linear() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.ReLU(), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -4.0, 3.0, 2.0], [0.5, 6.0, -7.0, 8.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.25, 0.125]]))
    return model


def test_level_prunes_remaining_weights_by_trained_magnitude_and_rewinds(tmp_path: Path) -> None:
    trained = two_linear().state_dict()
    rewind = {k: torch.full_like(v, 9.0) for k, v in trained.items()}
    masks = {"0.weight": torch.tensor([[True, True, True, True], [True, False, True, True]]),   # 6.0 gone
             "2.weight": torch.ones(3, 2, dtype=torch.bool)}
    torch.save({"weights": trained, "masks": masks, "rewind": rewind}, tmp_path / "end.pt")
    model = two_linear()
    cfg = LotteryConfig(method="lottery_level", prune_fraction=0.5, level=1, previous=str(tmp_path / "end.pt"))
    method = build_method(cfg, model, None, MethodContext(steps_per_epoch=5))
    method.setup()
    # density 0.5: 7 of 14 by |trained|, the pruned 6.0 excluded: 8, 7, 4, 3 (layer 0), 3 (layer 2), 2, 2 -> by index
    assert method.masks["0.weight"].tolist() == [[False, True, True, True], [False, False, True, True]]
    assert method.masks["2.weight"].tolist() == [[False, True], [True, False], [False, False]]
    assert model[0].weight.tolist() == [[0.0, 9.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]]   # rewound, then masked
    assert method.rewind is not None and torch.equal(method.rewind["0.weight"], rewind["0.weight"])


def test_level_without_rewinding_keeps_the_trained_weights(tmp_path: Path) -> None:
    trained = two_linear().state_dict()
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in trained.items()}
    torch.save({"weights": trained, "masks": masks, "rewind": None}, tmp_path / "end.pt")
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.ReLU(), nn.Linear(2, 3, bias=False))
    cfg = LotteryConfig(method="lottery_level", prune_fraction=0.75, level=1, scope="layer", rewind_step=None,
                        previous=str(tmp_path / "end.pt"))
    method = build_method(cfg, model, None, MethodContext())
    method.setup()
    # layer scope, density 0.25: round(2.0) = 2 of 8 and round(1.5) = 2 of 6 (round half to even)
    assert model[0].weight.tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -7.0, 8.0]]
    assert model[2].weight.tolist() == [[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]


def test_level_zero_records_the_rewind_point() -> None:
    model = two_linear()
    method = build_method(LotteryConfig(method="lottery_level", rewind_step=2), model, None,
                          MethodContext(steps_per_epoch=5))
    method.setup()
    assert method.rewind is None and method.masks.density() == 1.0
    method.after_step(0)
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    method.after_step(1)                                  # t = 2: the weights now are the rewind point
    with torch.no_grad():
        model[0].weight.fill_(6.0)
    method.after_step(2)
    assert method.rewind is not None and (method.rewind["0.weight"] == 5.0).all()


def test_lottery_config_checks() -> None:
    with pytest.raises(ValueError, match="^prune_fraction"):
        LotteryConfig(prune_fraction=1.0)
    with pytest.raises(ValueError, match="^previous"):
        LotteryConfig(level=1)
    with pytest.raises(ValueError, match="^rewind_step"):
        LotteryConfig(rewind_step=-1)


SMALL = ["data.name=digits", "data.batch_size=64", "model.name=conv", "model.options.width=8", "optim.lr=0.05",
         "monitor.progress=false", "monitor.tensorboard=false", "train.max_steps_per_epoch=4", "train.epochs=2",
         "sparsity.method=lottery_level", "sparsity.levels=2", "sparsity.prune_fraction=0.5",
         "sparsity.rewind_step=1"]


def test_lottery_levels_end_to_end_and_resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, [*SMALL, f"output_dir={tmp_path}", "name=imp"])
    rows = run_lottery(cfg)
    assert [r["level"] for r in rows] == [0, 1, 2]
    assert [r["density"] for r in rows] == pytest.approx([1.0, 0.5, 0.25], abs=1e-3)
    parent = tmp_path / "imp"
    assert json.loads((parent / "lottery.json").read_text()) == rows
    end1 = torch.load(parent / "level-01" / "lottery_end.pt", weights_only=True)
    end0 = torch.load(parent / "level-00" / "lottery_end.pt", weights_only=True)
    for name, mask in end1["masks"].items():           # masks nest and the rewind point travels unchanged
        assert not (mask & ~end0["masks"][name]).any()
        assert torch.equal(end1["rewind"][name], end0["rewind"][name])
    level2 = load_config(str(parent / "level-02" / "config.yaml"))
    assert level2.sparsity.level == 2 and level2.sparsity.previous == str(parent / "level-01" / "lottery_end.pt")

    # a crash in level 2 after its first epoch: the same call skips levels 0 and 1 and resumes level 2
    (parent / "level-02" / "summary.json").unlink()
    ckpts = sorted((parent / "level-02" / "checkpoints").glob("ckpt-*.pt"))
    ckpts[-1].unlink()
    (parent / "level-02" / "checkpoints" / "latest").unlink(missing_ok=True)
    calls: list[str] = []
    real_train = engine.lottery.train
    monkeypatch.setattr(engine.lottery, "train", lambda c: calls.append(c.name) or real_train(c))
    capsys.readouterr()
    again = run_lottery(cfg)
    assert calls == ["level-02"] and "resumed from" in capsys.readouterr().out
    assert again[2]["density"] == pytest.approx(0.25, abs=1e-3)
    summary = json.loads((parent / "level-02" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["run_dir"] == str(parent / "level-02")


def test_lottery_command_refuses_other_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["lottery", "data.name=digits", "sparsity.method=gradual", f"output_dir={tmp_path}"])
    assert code == 2 and "sparsity.method must be lottery_level" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not local"):
        engine.lottery.lottery_parent(load_config(None, [*SMALL, "output_dir=memory://x"]))

"""Sweep files are checked before Ray starts, with train's own one-line errors; the trial pieces that need no Ray."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import ConfigError
from tune.results import best_row, format_table, plot, write_csv
from tune.spec import PBT_MUTABLE, Distribution, flatten_space, load_sweep
from tune.trainable import TuneReporter, carry_mutations, checkpoint_at, resume_point

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))

BASE = {"model": {"name": "mlp", "options": {"hidden": [32]}}, "data": {"name": "digits", "val_fraction": 0.1},
        "train": {"epochs": 3, "device": "cpu"},
        "sparsity": {"method": "set", "density": 0.1, "period": 10}}


def _sweep(tmp_path: Path, **fields: object) -> str:
    data = {"name": "t", "base": BASE, "space": {"sparsity.drop_fraction": {"uniform": [0.1, 0.5]}},
            "sweep_dir": str(tmp_path / "sweeps")}
    data.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _error(tmp_path: Path, overrides: tuple[str, ...] = (), **fields: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_sweep(_sweep(tmp_path, **fields), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_example_sweeps_pass_the_checks(path: Path) -> None:
    plan = load_sweep(str(path))
    assert plan.space and plan.max_epochs >= 1
    assert plan.trial_config({k: d.first() for k, d in plan.space.items()}).data.name == "digits"


def test_example_sweeps_cover_the_issue_methods() -> None:
    methods = {load_sweep(str(p)).trial_config({}).sparsity.method for p in SWEEPS}
    assert {"set", "rigl", "dsr", "synflow", "snip", "synaptic_stripping", "grad_rewiring"} <= methods


def test_space_flattens_nested_sections_and_drawn_values_land_in_the_run_config(tmp_path: Path) -> None:
    space = {"sparsity": {"drop_fraction": {"choice": [0.2, 0.4]}}, "optim.lr": {"loguniform": [0.01, 0.1]},
             "seed": {"randint": [0, 5]}, "sparsity.period": {"grid": [5, 20]}}
    flat = flatten_space(space)
    assert flat == {"sparsity.drop_fraction": Distribution("choice", (0.2, 0.4)),
                    "optim.lr": Distribution("loguniform", (0.01, 0.1)), "seed": Distribution("randint", (0, 5)),
                    "sparsity.period": Distribution("grid", (5, 20))}
    assert flat["seed"].candidates() == [0, 4] and flat["optim.lr"].candidates() == [0.01, 0.1]
    plan = load_sweep(_sweep(tmp_path, space=space, set={"train": {"epochs": 2}}))
    cfg = plan.trial_config({"sparsity.drop_fraction": 0.4, "optim.lr": 0.05, "seed": 3, "sparsity.period": 20},
                            name="trial_x")
    assert (cfg.sparsity.drop_fraction, cfg.optim.lr, cfg.seed, cfg.sparsity.period) == (0.4, 0.05, 3, 20)
    assert cfg.train.epochs == 2 and plan.max_epochs == 2
    assert cfg.name == "trial_x" and cfg.output_dir == plan.trials_dir and not cfg.monitor.progress
    assert plan.experiment_dir == str(tmp_path / "sweeps" / "t")


def test_unknown_key_fails_with_trains_message(tmp_path: Path) -> None:
    message = _error(tmp_path, space={"sparsity.drop_fractoin": {"choice": [0.1]}})
    assert "unknown key 'sparsity.drop_fractoin'" in message and "did you mean 'drop_fraction'" in message
    assert message.startswith("space sparsity.drop_fractoin=0.1: ")


def test_key_of_another_method_fails(tmp_path: Path) -> None:
    base = {**BASE, "sparsity": {"method": "synflow", "density": 0.1}}
    message = _error(tmp_path, base=base)
    assert "unknown key 'sparsity.drop_fraction'" in message and "valid keys under sparsity" in message
    space = {"sparsity.density": {"choice": [0.05, 0.1]}, "sparsity.threshold_init": {"choice": [0.1]}}
    assert _error(tmp_path, space=space).startswith("space sparsity.threshold_init=0.1: unknown key")


def test_each_swept_method_must_have_every_swept_key(tmp_path: Path) -> None:
    space = {"sparsity.method": {"choice": ["set", "dsr"]}, "sparsity.drop_fraction": {"choice": [0.2]}}
    message = _error(tmp_path, space=space)
    assert "(sparsity.method=dsr)" in message and "unknown key 'sparsity.drop_fraction'" in message


def test_value_out_of_range_fails_like_train(tmp_path: Path) -> None:
    message = _error(tmp_path, space={"optim.lr": {"uniform": [-0.1, 0.1]}})
    assert message.startswith("space optim.lr=-0.1: optim.lr")


@pytest.mark.parametrize(("entry", "words"), [
    ({"unifrom": [0.1, 0.2]}, "unknown distribution 'unifrom' (did you mean 'uniform'?)"),
    ({"uniform": [0.5, 0.1]}, "needs low < high"),
    ({"uniform": [0.1]}, "must be [low, high]"),
    ({"loguniform": [0.0, 0.1]}, "positive low end"),
    ({"randint": [1.5, 4]}, "two integers"),
    ({"choice": []}, "non-empty list"),
    ([0.1, 0.2], "must be one distribution"),
])
def test_bad_distributions_fail_in_one_line(tmp_path: Path, entry: object, words: str) -> None:
    assert words in _error(tmp_path, space={"sparsity.drop_fraction": entry})


def test_sweep_file_errors(tmp_path: Path) -> None:
    assert "unknown key 'num_sample'" in _error(tmp_path, ("num_sample=3",))
    assert "metric must be one of" in _error(tmp_path, ("metric=val/accuracy",))
    assert "scheduler.name must be one of" in _error(tmp_path, ("scheduler.name=hyperband",))
    assert "needs a validation split" in _error(tmp_path, ("base.data.val_fraction=0",))
    assert "the sweep sets name" in _error(tmp_path, ("set.name=x",))
    assert "grace_period (4) is longer than train.epochs (3)" in _error(tmp_path, ("scheduler.grace_period=4",))
    assert "workers_per_trial must be at least 1" in _error(tmp_path, ("resources.workers_per_trial=0",))
    assert "parallel.backend is none" in _error(tmp_path, ("resources.workers_per_trial=2",
                                                           "base.parallel.backend=none"))
    assert "config file" in _error(tmp_path, base=str(tmp_path / "missing.yaml"))


def test_pbt_accepts_only_keys_that_can_change_mid_run(tmp_path: Path) -> None:
    pbt = ("scheduler.name=pbt", "num_samples=2")
    plan = load_sweep(_sweep(tmp_path, space={"optim.lr": {"loguniform": [0.01, 0.2]},
                                              "sparsity.drop_fraction": {"choice": [0.1, 0.3]}}), pbt)
    assert plan.sweep.scheduler.name == "pbt" and set(plan.space) <= set(PBT_MUTABLE)
    message = _error(tmp_path, pbt, space={"sparsity.density": {"choice": [0.05, 0.1]}})
    assert message.startswith("scheduler pbt: space.sparsity.density cannot change in the middle of a run")
    assert "optim.lr, sparsity.drop_fraction" in message
    assert "is a grid" in _error(tmp_path, pbt, space={"optim.lr": {"grid": [0.01, 0.1]}})
    assert "needs a population" in _error(tmp_path, ("scheduler.name=pbt",))
    assert "multiple of checkpoint.every_epochs (2)" in _error(tmp_path, (*pbt, "base.checkpoint.every_epochs=2"))
    assert "shorter than train.epochs (3)" in _error(tmp_path, (*pbt, "scheduler.perturbation_interval=3"))
    assert "quantile_fraction must be in (0, 0.5]" in _error(tmp_path, (*pbt, "scheduler.quantile_fraction=0.7"))


def test_pbt_explore_stays_inside_the_declared_ranges() -> None:
    from tune.runner import InRange

    clip = InRange(flatten_space({"optim.lr": {"uniform": [0.01, 0.1]}, "seed": {"randint": [0, 5]},
                                  "sparsity.drop_fraction": {"choice": [0.1, 0.3]}}))
    assert clip({"optim.lr": 0.12, "seed": 6, "sparsity.drop_fraction": 0.3}) == \
        {"optim.lr": 0.1, "seed": 4, "sparsity.drop_fraction": 0.3}
    assert clip({"optim.lr": 0.05, "seed": -1}) == {"optim.lr": 0.05, "seed": 0}


def test_carry_mutations_rescales_the_lr_schedule_and_records_the_new_values() -> None:
    state = {"lr_schedule": {"step": 30, "base_lrs": [0.1, 0.05]},
             "config": {"optim": {"lr": 0.1, "momentum": 0.9}, "sparsity": {"method": "set", "drop_fraction": 0.3}}}
    run = {"optim": {"lr": 0.02, "momentum": 0.5}, "sparsity": {"method": "set", "drop_fraction": 0.2}}
    assert carry_mutations(state, run) == {"optim.lr": [0.1, 0.02], "sparsity.drop_fraction": [0.3, 0.2]}
    assert state["lr_schedule"] == {"step": 30, "base_lrs": [pytest.approx(0.02), pytest.approx(0.01)]}
    assert state["config"]["optim"] == {"lr": 0.02, "momentum": 0.9}      # only PBT's keys are carried
    assert state["config"]["sparsity"]["drop_fraction"] == 0.2
    assert carry_mutations(state, run) == {}


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed here")
def test_optuna_without_the_package_is_one_line(tmp_path: Path) -> None:
    assert "pip install optuna" in _error(tmp_path, ("searcher.name=optuna",))


def test_cli_bad_sweep_exits_2_in_one_line_without_starting_ray(tmp_path: Path) -> None:
    path = _sweep(tmp_path, space={"sparsity.threshold_init": {"choice": [0.1]}})
    code = ("import sys; from launcher.cli import main; rc = main(['tune', sys.argv[1]]); "
            "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, path], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("sweep error")]
    assert len(lines) == 1 and "unknown key 'sparsity.threshold_init'" in lines[0]


# ------------------------------------------------------------------ checkpoints through the run directory contract
def _ckpt(run_dir: Path, epoch: int, step: int, text: str = "") -> Path:
    path = run_dir / "checkpoints" / f"ckpt-e{epoch:04d}-s{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text or f"epoch {epoch}")
    return path


def test_checkpoint_at_takes_that_epoch_or_the_newest_before(tmp_path: Path) -> None:
    run = tmp_path / "trial_a"
    _ckpt(run, 1, 10), _ckpt(run, 2, 20), _ckpt(run, 4, 40)
    assert checkpoint_at(str(run), 2).endswith("ckpt-e0002-s00000020.pt")
    assert checkpoint_at(str(run), 3).endswith("ckpt-e0002-s00000020.pt")
    assert checkpoint_at(str(run), 0) is None
    assert checkpoint_at(str(tmp_path / "none"), 3) is None


def test_resume_point_own_dir_and_copy_from_another_trial(tmp_path: Path) -> None:
    from engine.checkpoint import META_SUFFIX, load_state, save_state, verify_checkpoint

    own, donor = tmp_path / "trial_a", tmp_path / "trial_b"
    _ckpt(own, 1, 10), _ckpt(own, 3, 30)
    assert resume_point(str(own), {"run_dir": str(own), "epoch": 1}) == (f"{own}/checkpoints/ckpt-e0001-s00000010.pt",
                                                                         {})
    state = {"weights": torch.arange(3.0), "lr_schedule": {"step": 20, "base_lrs": [0.1]},
             "config": {"optim": {"lr": 0.1}}}
    (donor / "checkpoints").mkdir(parents=True)
    save_state(str(donor / "checkpoints" / "ckpt-e0002-s00000020.pt"), state)
    save_state(str(own / "checkpoints" / "ckpt-e0002-s00000020.pt"), {"weights": torch.zeros(3)})   # same name
    copied, changed = resume_point(str(own), {"run_dir": str(donor), "epoch": 2}, {"optim": {"lr": 0.05}})
    assert copied == f"{own}/checkpoints/ckpt-e0002-s00000020.pt" and changed == {"optim.lr": [0.1, 0.05]}
    assert verify_checkpoint(copied) is None            # a fresh checksum file, not the stale one of the same name
    loaded = load_state(copied)
    assert torch.equal(loaded["weights"], torch.arange(3.0)) and loaded["config"] == {"optim": {"lr": 0.05}}
    assert loaded["lr_schedule"]["base_lrs"] == [pytest.approx(0.05)]
    assert sorted(p.name for p in (own / "checkpoints").iterdir()) == ["ckpt-e0002-s00000020.pt",
                                                                      f"ckpt-e0002-s00000020.pt{META_SUFFIX}"]


def test_reporter_reports_after_the_save_with_a_pointer_to_the_written_file(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    from ray import tune

    from engine.trainer import train

    sent = []

    def report(metrics: dict, checkpoint: object = None) -> None:
        pointer = None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                pointer = json.loads((Path(folder) / "sparsetrain_pointer.json").read_text())
            # the file the pointer names is on disk when Tune gets the pointer
            found = checkpoint_at(pointer["run_dir"], pointer["epoch"])
            assert found is not None and Path(found).name.startswith(f"ckpt-e{pointer['epoch']:04d}-")
        sent.append((metrics, pointer))

    monkeypatch.setattr(tune, "report", report)
    plan = load_sweep(_sweep(tmp_path, set={"checkpoint.every_epochs": 2, "monitor.tensorboard": False,
                                            "data.batch_size": 256, "train.eval_every_epochs": 3}))
    cfg = plan.trial_config({}, name="trial_x")
    run_dir = f"{plan.trials_dir}/trial_x"
    train(cfg, callbacks=[TuneReporter(run_dir)])
    assert [p for _, p in sent] == [None, {"run_dir": run_dir, "epoch": 2}, {"run_dir": run_dir, "epoch": 3}]
    assert [m["epoch"] for m, _ in sent] == [1, 2, 3] and "test/acc" in sent[2][0]


# ------------------------------------------------------------------------------------------------------ results
def test_table_csv_best_and_plot(tmp_path: Path) -> None:
    plan = load_sweep(_sweep(tmp_path, space={"sparsity.drop_fraction": {"choice": [0.1, 0.3]},
                                              "sparsity.density": {"choice": [0.05, 0.1]}}))
    rows = [{"trial": "trial_0", "sparsity.drop_fraction": 0.1, "sparsity.density": 0.05, "metric": 0.9,
             "density": 0.05, "stopped_early": False, "status": "done", "val_acc": 0.9},
            {"trial": "trial_1", "sparsity.drop_fraction": 0.3, "sparsity.density": 0.1, "metric": 0.95,
             "density": 0.1, "stopped_early": True, "status": "done", "val_acc": 0.95},
            {"trial": "trial_2", "sparsity.drop_fraction": 0.3, "sparsity.density": 0.05, "metric": math.nan,
             "density": 0.05, "stopped_early": False, "status": "error", "val_acc": math.nan}]
    assert best_row(plan, rows)["trial"] == "trial_0"       # trials that ran to the end come first
    plan.sweep.mode = "min"
    assert best_row(plan, rows)["trial"] == "trial_0"
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["trial", "sparsity.drop_fraction", "sparsity.density"] and len(table) == 4
    assert "-" in table[3].split()
    write_csv(rows, str(tmp_path / "t.csv"))
    with open(tmp_path / "t.csv") as handle:
        read = list(csv.DictReader(handle))
    assert [r["trial"] for r in read] == ["trial_0", "trial_1", "trial_2"] and read[1]["stopped_early"] == "True"
    plot(plan, rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_config_key_given_to_tune_points_at_set_and_space() -> None:
    sweep = str(Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "set_digits.yaml")
    with pytest.raises(ConfigError, match=r"goes under set \(set\.sparsity\.drop_fraction=0\.3\) or, to sweep it"):
        load_sweep(sweep, ["sparsity.drop_fraction=0.3"])
    assert load_sweep(sweep, ["set.sparsity.drop_fraction=0.3", "name=other"]) is not None

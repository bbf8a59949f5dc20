"""Settings that would silently do nothing in a run fail before training in one line, or warn where they can be meant.

Each case names the key and the fix; ``MethodConfig.check_length`` holds the run-length checks (the trainer calls it
once the epoch's length is known), ``__post_init__`` the key-against-key ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import ConfigError
from engine.run_config import load_config
from engine.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[16]", "optim.lr=0.05",
         "monitor.progress=false", "monitor.tensorboard=false"]


def sparsity(*overrides: str):
    """The sparsity section of a config built from the overrides (checked like the launcher checks it)."""
    return load_config(None, [*SMALL, *overrides]).sparsity


# ------------------------------------------------------------------------------------------------- DST: set, rigl, dsr
def test_rigl_default_period_longer_than_the_run_fails_before_training(tmp_path: Path) -> None:
    # the case: period 100 on 3 epochs x 23 steps = 69 steps never updates a mask
    cfg = load_config(None, [*SMALL, "sparsity.method=rigl", "sparsity.density=0.2", "train.epochs=3",
                             "train.max_steps_per_epoch=23", f"output_dir={tmp_path}", "name=rigl"])
    with pytest.raises(ConfigError) as caught:
        train(cfg)
    message = str(caught.value)
    assert message.startswith("sparsity.period=100: rigl would never update its masks in this run of 69 steps "
                              "(3 epochs of 23)")
    assert "sparsity.period=6" in message and "\n" not in message
    assert not list(tmp_path.glob("*/summary.json"))      # nothing trained


def test_the_launcher_says_it_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main

    code = main(["train", *SMALL, "sparsity.method=set", "train.epochs=2", "train.max_steps_per_epoch=5",
                 f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("config error: sparsity.period=100: set would never update its masks in this "
                                        "run of 10 steps (2 epochs of 5)") and err.count("\n") == 1, err


def test_period_that_fits_passes() -> None:
    assert sparsity("sparsity.method=rigl", "sparsity.period=69").check_length(23, 3) == []


def test_dsr_period_overridden_by_periods_fails() -> None:
    with pytest.raises(ConfigError, match=r"^sparsity\.period 50 is never used: periods takes over from epoch 0 "
                                          r"\(period_epochs=\[0, 25, 80, 140\]\); set sparsity\.period_epochs=\[\] "):
        sparsity("sparsity.method=dsr", "sparsity.period=50")
    constant = sparsity("sparsity.method=dsr", "sparsity.period=50", "sparsity.period_epochs=[]", "sparsity.periods=[]")
    assert constant.period == 50
    later = sparsity("sparsity.method=set", "sparsity.period=50", "sparsity.period_epochs=[2]", "sparsity.periods=[9]")
    assert later.period == 50    # the period is used until epoch 2: not overridden


def test_dsr_periods_longer_than_the_run_fail() -> None:
    cfg = sparsity("sparsity.method=dsr")      # periods 100, 200, ... from epoch 0
    with pytest.raises(ValueError, match=r"^sparsity\.periods=\[100, 200, 400, 800\] \(from epochs \[0, 25, 80, 140\]\)"
                                         r": dsr would never update its masks in this run of 60 steps"):
        cfg.check_length(20, 3)


def test_stop_epoch_zero_fails() -> None:
    with pytest.raises(ValueError, match=r"^sparsity\.stop_epoch=0: set would never update its masks"):
        sparsity("sparsity.method=set", "sparsity.period=1", "sparsity.stop_epoch=0").check_length(10, 2)


def test_stop_epoch_and_period_epochs_after_the_run_warn() -> None:
    notes = sparsity("sparsity.method=rigl", "sparsity.period=5", "sparsity.stop_epoch=9", "sparsity.period_epochs=[1, 4]",
                     "sparsity.periods=[3, 7]").check_length(10, 3)
    assert notes == ["sparsity.stop_epoch=9 is after the run's 3 epochs: updates never stop (a cosine drop fraction "
                     "still decays towards that epoch)",
                     "sparsity.period_epochs [4] start after the last update epoch (2): those periods never take "
                     "effect"]


# ---------------------------------------------------------------------------------------------- schedules and ramps
def test_gradual_schedule_ending_after_the_run_fails() -> None:
    cfg = sparsity("sparsity.method=gradual", "sparsity.schedule.end=500")
    with pytest.raises(ValueError, match=r"^sparsity\.schedule: start \(0\) and end \(500\) must satisfy .* <= 60 .*"
                                         r"with 20 steps per epoch x 3 epochs"):
        cfg.check_length(20, 3)
    assert cfg.check_length(200, 3) == []


def test_unit_schedule_starting_after_the_run_fails() -> None:
    cfg = sparsity("sparsity.method=unit", "sparsity.schedule.name=one_shot", "sparsity.schedule.start=90")
    with pytest.raises(ValueError, match=r"^sparsity\.schedule: "):
        cfg.check_length(20, 3)


def test_union_mask_end_after_the_run_fails() -> None:
    cfg = sparsity("sparsity.method=union_mask", "sparsity.end=100", "sparsity.cycles=3")
    with pytest.raises(ValueError, match=r"^sparsity\.end \(100 steps\) is after the run's last step \(60\).*"
                                         r"\(a run of 20 steps per epoch x 3 epochs\)"):
        cfg.check_length(20, 3)
    assert cfg.check_length(40, 3) == []


def test_lottery_rewind_after_the_level_fails() -> None:
    cfg = sparsity("sparsity.method=lottery_level", "sparsity.rewind_step=80")
    with pytest.raises(ValueError, match=r"^sparsity\.rewind_step=80 is after a level's last step \(60 = 20 steps"):
        cfg.check_length(20, 3)


# ------------------------------------------------------------------------------------------------ at init, Deep R
def test_at_init_schedule_with_one_iteration_warns() -> None:
    notes = sparsity("sparsity.method=magnitude", "sparsity.schedule=linear").check_length(10, 1)
    assert notes == ["sparsity.schedule=linear has no effect with sparsity.iterations=1 (one iteration prunes "
                     "straight to the density); set sparsity.iterations above 1 for a schedule"]
    assert sparsity("sparsity.method=magnitude", "sparsity.schedule=linear",
                    "sparsity.iterations=3").check_length(10, 1) == []
    assert sparsity("sparsity.method=snip", "sparsity.density=1.0").check_length(10, 1) == [
        "sparsity.density=1 keeps every weight: snip prunes nothing and the run is dense"]


def test_deep_r_never_rewiring_fails_and_late_settings_warn() -> None:
    with pytest.raises(ValueError, match=r"^sparsity\.stop_epoch=0: deep_r would never rewire"):
        sparsity("sparsity.method=deep_r", "sparsity.stop_epoch=0").check_length(10, 2)
    notes = sparsity("sparsity.method=deep_r", "sparsity.stop_epoch=5", "sparsity.log_every=50").check_length(10, 2)
    assert notes == ["sparsity.stop_epoch=5 is after the run's 2 epochs: rewiring never stops",
                     "sparsity.log_every=50 is longer than the run (20 steps): no rewiring count is ever logged"]


# ------------------------------------------------------------------------------------------------ the trainer's side
def test_warnings_and_start_lines_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, [*SMALL, "sparsity.method=set", "sparsity.density=0.5", "sparsity.period=1",
                             "sparsity.stop_epoch=4", "train.epochs=1", "train.max_steps_per_epoch=2",
                             "train.grad_accum_steps=2", f"output_dir={tmp_path}", "name=lines"])
    summary = train(cfg)
    out, err = capsys.readouterr()
    assert "warning: sparsity.stop_epoch=4 is after the run's 1 epochs: updates never stop" in err
    # mlp hidden [16] on 8x8 digits: 64x16 and 16x10 weights
    assert "prunable: 2 layers, 1,184 weights: " in out
    assert "global batch 128 (data.batch_size 64 per rank x 1 rank x 2 accumulation steps), 2 optimizer steps" in out
    on_disk = json.loads((tmp_path / "lines" / "summary.json").read_text())
    assert on_disk["prunable"]["weights"] == 1184 == summary["prunable"]["weights"]
    assert len(on_disk["prunable"]["layers"]) == 2


# ------------------------------------------------------------------------------------------------ launcher prune
def test_prune_reports_never_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main

    command = ["prune", "data.name=digits", "model.name=mlp", "model.options.hidden=[8]", f"output_dir={tmp_path}",
               "name=p", "--methods", "magnitude", "--compressions", "0,1"]
    assert main(command) == 0
    first = (tmp_path / "p-prune" / "prune.json").read_text()
    assert main([*command[:-1], "0.5"]) == 0
    second = json.loads((tmp_path / "p-prune-2" / "prune.json").read_text())
    assert (tmp_path / "p-prune" / "prune.json").read_text() == first             # the first report is untouched
    assert [r["compression"] for r in second["methods"]["magnitude"]["runs"]] == [0.5]
    assert (tmp_path / "p-prune-2" / "config.yaml").exists()
    assert f"report written to {tmp_path}/p-prune-2/prune.json" in capsys.readouterr().out

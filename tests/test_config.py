"""Config loading: YAML + dotted overrides -> typed tree; every bad input fails in one line naming key and fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import ConfigError, apply_overrides, to_dict
from engine.run_config import load_config
from pruning.methods.at_init import AtInitConfig

REPO = Path(__file__).resolve().parents[1]

BAD_INPUTS = [
    (["optim.lrr=0.1"], "unknown key 'optim.lrr' (did you mean 'lr'?); valid keys under optim: name, lr,"),
    (["optim.lr=-1"], "optim.lr must be positive, got -1.0"),
    (["optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
    (["optim.name=sgdd"], "optim.name must be one of 'sgd', 'adam', 'adamw', got 'sgdd' (did you mean 'sgd'?)"),
    (["train.epochs=0"], "train.epochs must be at least 1, got 0"),
    (["train.epochs=2.5"], "train.epochs must be an integer, got 2.5"),
    (["sparsity.method=magnitude", "sparsity.density=1.5"],
     "sparsity.density must be in (0, 1] (the fraction of weights kept), got 1.5"),
    (["sparsity.method=magnitud"], "sparsity.method 'magnitud' is not a known sparsity method (did you mean "
                                   "'magnitude'?); valid: deep_r, dense, "),
    (["sparsity.method=random", "sparsity.distribution=erk"],
     "sparsity.distribution 'erk' sets per-layer budgets; it needs scope: layer (set sparsity.scope=layer)"),
    (["sparsity.targets.exclude_roles=[head]"], "sparsity.targets.exclude_roles has unknown role 'head'"),
    (["model.name=resnet19"], "model: unknown model 'resnet19'"),
    (["model.name=mlp", "model.options.widht=3"], "model: model mlp has no option 'widht'"),
    (["data.name=cifar11"], "data.name"),
    (["data.batch_size=0"], "data.batch_size"),
    (["train.precision=fp8"], "train.precision must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
    (["train.device=cpu", "train.precision=fp16"], "train.precision fp16 needs CUDA; use bf16 or fp32 on the CPU"),
    pytest.param(["train.precision=fp16"], "train.precision fp16 needs CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="device auto picks CUDA here")),
    (["lr_schedule.name=step"], "lr_schedule.milestones must list at least one epoch for name: step"),
    (["train.epochs=10", "lr_schedule.name=step", "lr_schedule.milestones=[5,20]"],
     "lr_schedule.milestones has epoch 20.0 at or after train.epochs (10)"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["parallel.backend=horovod"], "parallel.backend must be one of 'auto', 'none', 'ddp', 'deepspeed', got 'horovod'"),
    (["optim.betas=[0.9]"], "optim.betas must be a list of 2 values, got 1"),
    (["optim.nesterov=yes please"], "optim.nesterov must be true or false, got 'yes please'"),
    (["optim"], "override 'optim' must look like key=value, e.g. optim.lr=0.05"),
    (["optim.lr=0.1", "optim.lr.x=1"], "override 'optim.lr.x=1': optim.lr is a value, not a section"),
    (["name=a/b"], "name must be a non-empty run name without '/'"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS,
                         ids=[" ".join(case.values[0] if hasattr(case, "values") else case[0]) for case in BAD_INPUTS])
def test_bad_input_fails_with_one_line_naming_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    text = str(caught.value)
    assert message in text, text
    assert "\n" not in text


def test_defaults_build_and_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["sparsity.method=magnitude", "sparsity.density=0.2", "optim.lr=1e-3",
                             "lr_schedule.milestones=[1,2]", "train.epochs=3"])
    assert isinstance(cfg.sparsity, AtInitConfig) and cfg.sparsity.density == 0.2
    assert cfg.optim.lr == 0.001   # '1e-3' arrives from YAML as a string and is still a number
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    again = load_config(str(path))
    assert to_dict(again) == to_dict(cfg)


def test_overrides_create_sections_and_switch_method() -> None:
    data = apply_overrides({"sparsity": {"method": "magnitude", "scope": "layer"}}, ["sparsity.method=random",
                                                                                     "model.options.hidden=[8]"])
    assert data == {"sparsity": {"method": "random", "scope": "layer"}, "model": {"options": {"hidden": [8]}}}


def test_quickstart_config_is_valid() -> None:
    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"))
    assert cfg.sparsity.method != "dense" and cfg.sparsity.density <= 0.1


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*nope.yaml not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        load_config(str(bad))


def test_launcher_rejects_bad_config_before_any_worker(tmp_path: Path) -> None:
    """Even with --nproc-per-node 2, a bad key fails in the launcher with exit 2 and one line on stderr."""
    result = subprocess.run([sys.executable, "-m", "launcher", "train", "--nproc-per-node", "2",
                             "optim.lr=-3", f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: optim.lr must be positive, got -3.0"
    assert not any(tmp_path.iterdir())


def test_launcher_rejects_missing_data(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "launcher", "train", "data.name=cifar10",
                             f"data.root={tmp_path}", "model.name=conv"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("data error: ") and "data.download=true" in lines[0]


def test_overrides_may_follow_options(tmp_path: Path) -> None:
    """`train --print-config key=value` and `train key=value --print-config` mean the same; junk is refused."""
    after = subprocess.run([sys.executable, "-m", "launcher", "train", "--print-config", "optim.lr=0.03"],
                           cwd=REPO, capture_output=True, text=True)
    assert after.returncode == 0 and yaml.safe_load(after.stdout)["optim"]["lr"] == 0.03
    junk = subprocess.run([sys.executable, "-m", "launcher", "train", "--print-config", "--bogus"],
                          cwd=REPO, capture_output=True, text=True)
    assert junk.returncode == 2 and "unrecognized arguments: --bogus" in junk.stderr

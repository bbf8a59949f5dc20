"""End-to-end runs on digits: the run-directory contract, fsspec output, checkpoints and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import torch
import yaml

from engine.checkpoint import load_state
from engine.run_config import load_config
from engine.trainer import train

SMALL = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[32]",
         "optim.lr=0.05", "sparsity.method=magnitude", "sparsity.density=0.2", "sparsity.scope=layer",
         "sparsity.distribution=erk", "monitor.progress=false",
         "train.max_steps_per_epoch=6", "data.augment=standard"]


def run(*overrides: str) -> dict:
    return train(load_config(None, [*SMALL, *overrides]))


def test_run_directory_contract(tmp_path: Path) -> None:
    summary = run(f"output_dir={tmp_path}", "name=contract", "train.epochs=2")
    run_dir = tmp_path / "contract"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ["test_acc", "best_test_acc", "density", "params_total", "params_nonzero", "epochs", "steps",
                "world_size", "wall_time_s"]:
        assert key in on_disk, key
    assert 0.0 <= on_disk["test_acc"] <= on_disk["best_test_acc"] <= 1.0
    assert on_disk["density"] == pytest.approx(0.2, abs=1e-3)
    assert (on_disk["epochs"], on_disk["steps"], on_disk["world_size"]) == (2, 12, 1)
    assert on_disk["params_nonzero"] < on_disk["params_total"]
    assert summary["test_acc"] == on_disk["test_acc"]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["sparsity"]["density"] == 0.2 and resolved["optim"]["lr"] == 0.05
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*.pt"))
    again = run(f"output_dir={tmp_path}", "name=contract", "train.epochs=1")   # never overwrites a run
    assert again["run_dir"].endswith("contract-2")


def test_fsspec_memory_output_and_loadable_checkpoint() -> None:
    out = "memory://sparsetrain-test-out"
    summary = run(f"output_dir={out}", "name=mem", "train.epochs=1", "monitor.tensorboard=false")
    fs = fsspec.filesystem("memory")
    assert fs.exists("/sparsetrain-test-out/mem/summary.json")
    state = load_state(_latest(f"{out}/mem/checkpoints"))
    masks = state["masks"]
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == round(0.2 * total)
    for name, mask in masks.items():
        assert (state["model"][name][~mask] == 0).all()
    assert summary["steps"] == state["step"] == 6
    fs.rm("/sparsetrain-test-out", recursive=True)


def _latest(directory: str) -> str:
    from engine.checkpoint import Checkpointer

    url = Checkpointer(directory).latest()
    assert url is not None
    return url


def test_resumed_run_ends_with_the_same_weights(tmp_path: Path) -> None:
    """3 epochs straight vs 2 epochs + resume: same weights, masks, optimizer state and step."""
    full = run(f"output_dir={tmp_path}", "name=full", "train.epochs=3", "checkpoint.keep=5")
    ckpts = sorted((tmp_path / "full" / "checkpoints").glob("ckpt-*.pt"))
    assert len(ckpts) == 3
    resumed = run(f"output_dir={tmp_path}", "name=full", "train.epochs=3", "checkpoint.keep=5",
                  f"resume={ckpts[1]}")
    assert resumed["run_dir"] == full["run_dir"] and resumed["steps"] == full["steps"] == 18
    straight, again = load_state(str(ckpts[2])), load_state(_latest(str(tmp_path / "full" / "checkpoints")))
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, again["model"][name]), name
    for name, mask in straight["masks"].items():
        assert torch.equal(mask, again["masks"][name])
    for index, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], again["optimizer"]["state"][index]["momentum_buffer"])
    assert resumed["test_acc"] == full["test_acc"]


def test_resume_auto_starts_fresh_then_continues(tmp_path: Path) -> None:
    first = run(f"output_dir={tmp_path}", "name=pre", "train.epochs=1", "resume=auto")
    assert first["epochs"] == 1
    second = run(f"output_dir={tmp_path}", "name=pre", "train.epochs=2", "resume=auto")
    assert second["run_dir"] == first["run_dir"] and second["epochs"] == 2 and second["steps"] == 12


def test_dense_baseline_and_grad_accumulation(tmp_path: Path) -> None:
    base = [o for o in SMALL if not o.startswith("sparsity.")]   # dense has no density: strict keys refuse it
    summary = train(load_config(None, [*base, f"output_dir={tmp_path}", "name=dense", "sparsity.method=dense",
                                       "train.epochs=1", "train.grad_accum_steps=2", "train.max_steps_per_epoch=3"]))
    assert summary["density"] == 1.0 and summary["steps"] == 3


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path: Path) -> None:
    """The mixed-precision and memory-format paths run (on CUDA they are the fast path; here they must be right)."""
    summary = run(f"output_dir={tmp_path}", "name=bf16", "model.name=conv", "model.options={}",
                  "train.precision=bf16", "train.channels_last=true", "train.epochs=1", "train.max_steps_per_epoch=3")
    assert summary["steps"] == 3 and 0.0 <= summary["test_acc"] <= 1.0
    state = load_state(_latest(str(tmp_path / "bf16" / "checkpoints")))
    for name, mask in state["masks"].items():
        assert (state["model"][name][~mask] == 0).all()

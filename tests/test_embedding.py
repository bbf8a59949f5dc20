"""A run is embeddable and repeatable: callbacks, validation metrics, cleanup on every path, no reference cycle.

A Ray Tune worker runs many trials in one process, and a notebook calls ``train`` again and again: each run must
leave the process as it found it and give the result it gives in a fresh process.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from engine.backends import DistEnv, build_backend, pick_device
from engine.run_config import load_config
from engine.trainer import Trainer, train
from pruning.methods import DecisionPass
from tests import embed_probe

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[16]",
        "sparsity.method=magnitude", "sparsity.density=0.3", "train.max_steps_per_epoch=3", "train.device=cpu",
        "monitor.progress=false", "optim.lr=0.05"]


def _flags() -> tuple[bool, bool, bool]:
    return (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


def _fresh(kind: str, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}   # same threads: same float sums
    result = subprocess.run([sys.executable, "tests/embed_probe.py", kind, str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / f"{kind}.pt", weights_only=True)


def test_three_runs_in_one_process_equal_fresh_processes_and_leave_it_as_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import sklearn.datasets  # noqa: F401  (its first import sets OpenMP variables: a library's doing, not a run's)
    torch.backends.cudnn.benchmark = True      # a state the CPU runs would change (they turn it off)
    flags, environ = _flags(), dict(os.environ)
    here: dict[str, dict[str, Any]] = {}
    here["plain"] = embed_probe.run("plain", str(tmp_path / "one"))
    assert _flags() == flags and dict(os.environ) == environ
    embed_probe.make_group()
    try:
        group = dist.group.WORLD
        for kind in ("group", "deepspeed"):
            here[kind] = embed_probe.run(kind, str(tmp_path / "one"))
            assert dist.is_initialized() and dist.group.WORLD is group, f"the {kind} run destroyed the test's group"
            assert _flags() == flags, f"the {kind} run left torch flags changed"
            assert dict(os.environ) == environ, f"the {kind} run left the environment changed"
        box = [torch.ones(1)]
        dist.all_reduce(box[0])                 # the test's own group still works
    finally:
        dist.destroy_process_group()
    assert DistEnv.from_environ() == DistEnv()  # the launcher would not think it is a torchrun worker
    for kind in embed_probe.KINDS:
        fresh = _fresh(kind, tmp_path)
        assert here[kind]["test_acc"] == fresh["test_acc"] and here[kind]["test_loss"] == fresh["test_loss"], kind
        for name, tensor in fresh["model"].items():
            assert torch.equal(here[kind]["model"][name], tensor), f"{kind}: {name} differs from a fresh process"
        for name, mask in fresh["masks"].items():
            assert torch.equal(here[kind]["masks"][name], mask), kind


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.seen: list[tuple[int, dict[str, float]]] = []
        self.stop_after = stop_after

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        self.seen.append((epoch, dict(metrics)))
        return self.stop_after is not None and epoch + 1 >= self.stop_after


def test_callbacks_see_train_val_and_test_metrics_and_can_stop_the_run(tmp_path: Path) -> None:
    watcher, stopper = Recorder(), Recorder(stop_after=2)
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "train.epochs=5", "data.val_fraction=0.2"])
    summary = train(cfg, callbacks=[watcher, stopper])
    assert [epoch for epoch, _ in watcher.seen] == [0, 1]          # every callback is called, then the run stops
    for _, metrics in watcher.seen:
        for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "density", "lr",
                    "epoch", "step"):
            assert key in metrics, key
        assert metrics["density"] == pytest.approx(0.3, abs=1e-3)
    assert summary["epochs"] == 2 and summary["stopped_early"] is True
    assert 0.0 <= summary["val_acc"] <= 1.0
    assert list((Path(summary["run_dir"]) / "checkpoints").glob("ckpt-e0002-*.pt"))   # a stopped run is saved


def test_a_failing_run_closes_its_writer_and_restores_flags(tmp_path: Path) -> None:
    class Boom:
        def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
            raise RuntimeError("boom")

    torch.backends.cudnn.benchmark = True
    flags, threads = _flags(), threading.active_count()
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "train.epochs=2"])
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, callbacks=[Boom()])
    assert _flags() == flags
    assert threading.active_count() == threads          # TensorBoard's writer thread is gone
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "monitor.tensorboard=false", *overrides])
    env = DistEnv.from_environ()
    return Trainer(cfg, build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision))


def test_no_reference_cycle_through_the_trainer(tmp_path: Path) -> None:
    gc.collect()
    gc.disable()
    try:
        trainer = _trainer(tmp_path, "train.epochs=1", "sparsity.method=snip")   # SNIP reads scoring batches
        trainer.fit()
        trainer.close()
        ref = weakref.ref(trainer)
        del trainer
        assert ref() is None, "the trainer is only freed by the cycle collector"
    finally:
        gc.enable()


def test_decision_pass_sums_each_probe_over_the_split_with_hooks_only_during_the_pass(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.epochs=1", "data.val_fraction=0.25")
    decided: list[dict[str, torch.Tensor]] = []

    def ask(epoch: int) -> DecisionPass:
        return DecisionPass(split="val", probes={"features.1": lambda out: (out > 0).sum(0)},
                            decide=decided.append)

    trainer.method.decision_pass = ask
    relu = trainer.model.get_submodule("features.1")
    trainer.fit()
    trainer.close()
    assert not relu._forward_hooks                      # the hooks lived only during the pass
    expected = torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        trainer.model.eval()
        for inputs, _ in trainer.loaders.val:
            hidden = trainer.model.features(torch.flatten(trainer.batches.inputs(inputs), 1))
            expected += (hidden > 0).sum(0).double()
    assert len(decided) == 1 and torch.equal(decided[0]["features.1"], expected)


def test_a_pass_over_a_split_not_evaluated_this_epoch_runs_on_its_own(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.epochs=2", "train.eval_every_epochs=5")
    counts: list[float] = []
    trainer.method.decision_pass = lambda epoch: DecisionPass(
        split="train", probes={"classifier": lambda out: torch.tensor([float(out.shape[0])])},
        decide=lambda sums: counts.append(float(sums["classifier"][0])))
    trainer.fit()
    trainer.close()
    assert counts == [len(trainer.loaders.train.dataset)] * 2


def test_a_pass_over_a_missing_split_fails_in_one_line(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.epochs=1")
    trainer.method.decision_pass = lambda epoch: DecisionPass(split="val", probes={}, decide=lambda sums: None)
    with pytest.raises(ValueError, match="val_fraction"):
        trainer.fit()
    trainer.close()


def test_two_ranks_decide_from_the_same_sums_and_stop_together(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    overrides = [*TINY, f"output_dir={tmp_path}", "train.epochs=3", "data.val_fraction=0.25",
                 "parallel.backend=ddp", "monitor.tensorboard=false"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/decision_probe.py", str(tmp_path), *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["decided"] == ranks[1]["decided"] and len(ranks[0]["decided"]) == 3
    assert ranks[0]["decided"][0][0] == ranks[0]["val_size"]       # every held-out sample, summed over both ranks
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == 3           # rank 1's wish to stop was not rank 0's

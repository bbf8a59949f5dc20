"""Runs never overwrite other runs: exclusive run-directory claims, checkpoint-directory owners, resume config checks,
finished records kept, lottery levels reused only under their own settings; CIFAR pickles never run code; a failure
inside a run is one line with its traceback in a log file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from engine.config import ConfigError
from engine.data import DataConfig, build_loaders, check_data_available
from engine.data import torchvision_sets
from engine.lottery import run_lottery
from engine.run_config import load_config
from engine.run_dirs import (RunDirError, check_checkpoint_dir, claim_checkpoint_dir, claim_new_run_dir,
                             config_changes, create_exclusive)
from engine.trainer import train
from launcher.cli import main
from launcher.common import report_failure

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.options.hidden=[8]", "train.epochs=1", "train.max_steps_per_epoch=2", "monitor.tensorboard=false",
        "monitor.progress=false", "data.batch_size=64"]


@pytest.mark.parametrize("base", ["local", "memory"])
def test_runs_started_together_get_their_own_directories(base: str, tmp_path: Path) -> None:
    root = str(tmp_path) if base == "local" else "memory://claims"
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(claim_new_run_dir(root, "same"))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(found) == sorted([f"{root}/same"] + [f"{root}/same-{n}" for n in range(2, 7)])
    assert not create_exclusive(f"{root}/same/.run", "again")   # the marker is there, and is not replaced
    fs, path = fsspec.core.url_to_fs(f"{root}/same/.run")
    assert fs.cat_file(path).decode() != "again"


def test_checkpoint_directory_belongs_to_one_run(tmp_path: Path) -> None:
    ckpts = str(tmp_path / "shared")
    claim_checkpoint_dir(ckpts, str(tmp_path / "a"), None)
    claim_checkpoint_dir(ckpts, str(tmp_path / "a") + "/", None)      # the same run, spelled differently
    with pytest.raises(RunDirError, match=r"^checkpoint.dir .*/shared belongs to run .*/a; point checkpoint.dir"):
        claim_checkpoint_dir(ckpts, str(tmp_path / "b"), None)
    (tmp_path / "loose").mkdir()
    torch.save({}, tmp_path / "loose" / "ckpt-e0001-s00000001.pt")
    with pytest.raises(RunDirError, match="already holds 1 checkpoint"):
        check_checkpoint_dir(str(tmp_path / "loose"), str(tmp_path / "c"), None)
    check_checkpoint_dir(str(tmp_path / "loose"), str(tmp_path / "c"),   # resuming one of them adopts the directory
                         str(tmp_path / "loose" / "ckpt-e0001-s00000001.pt"))


def test_config_changes_allow_only_safe_keys() -> None:
    old = {"optim": {"lr": 0.1}, "train": {"epochs": 5}, "monitor": {"progress": True}, "name": "a",
           "checkpoint": {"keep": 2, "every_epochs": 1}}
    same_run = {"optim": {"lr": 0.1}, "train": {"epochs": 8}, "monitor": {"progress": False}, "name": "b",
                "checkpoint": {"keep": 5, "every_epochs": 2}}
    assert config_changes(old, same_run) == []
    assert config_changes(old, same_run, grow_epochs=False) == ["train.epochs 5 -> 8"]
    shorter = {**same_run, "train": {"epochs": 4}, "optim": {"lr": 0.2}}
    assert config_changes(old, shorter) == ["optim.lr 0.1 -> 0.2", "train.epochs 5 -> 4"]
    assert config_changes({"sparsity": {"method": "dense"}}, {"sparsity": {"method": "snip", "density": 0.1}}) == [
        "sparsity.density '<unset>' -> 0.1", "sparsity.method 'dense' -> 'snip'"]


def test_other_run_pointing_at_checkpoints_is_refused_inside_train(tmp_path: Path) -> None:
    """The trainer refuses too (a Tune worker or a script calls train() without the launcher's checks)."""
    train(load_config(None, [*TINY, f"output_dir={tmp_path}", "name=first"]))
    before = sorted(p.name for p in (tmp_path / "first" / "checkpoints").iterdir())
    with pytest.raises(RunDirError, match="belongs to run"):
        train(load_config(None, [*TINY, f"output_dir={tmp_path}", "name=second",
                                 f"checkpoint.dir={tmp_path / 'first' / 'checkpoints'}"]))
    assert sorted(p.name for p in (tmp_path / "first" / "checkpoints").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]      # refused before its directory was claimed


def test_finished_runs_keep_their_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", *TINY, f"output_dir={tmp_path}", "name=job", "resume=auto"]
    assert main(args) == 0
    run = tmp_path / "job"
    record = {name: (run / name).read_bytes() for name in ("summary.json", "config.yaml")}
    capsys.readouterr()
    assert main(args) == 0                       # the same command again: nothing to do, nothing rewritten
    assert "already trained 1 epochs" in capsys.readouterr().out
    assert {name: (run / name).read_bytes() for name in record} == record
    assert main([*args, "train.epochs=2"]) == 0  # extended: trains on, the finished record moves to history/
    assert (run / "history" / "summary-e0001.json").read_bytes() == record["summary.json"]
    assert (run / "history" / "config-e0001.yaml").read_bytes() == record["config.yaml"]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


def test_lottery_reuses_levels_only_under_their_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[8]",
             "monitor.progress=false", "monitor.tensorboard=false", "train.max_steps_per_epoch=2", "train.epochs=1",
             "sparsity.method=lottery_level", "sparsity.levels=1", f"output_dir={tmp_path}", "name=imp"]
    run_lottery(load_config(None, [*small, "sparsity.prune_fraction=0.5"]))
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"has level-00 from other settings \(sparsity.prune_fraction 0.5 -> 0.2\)"):
        run_lottery(load_config(None, [*small, "sparsity.prune_fraction=0.2"]))
    capsys.readouterr()
    assert main(["lottery", *small, "optim.lr=0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: lottery ") and "optim.lr 0.1 -> 0.3" in err[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def _fake_cifar(root: Path, payload: bytes | None = None) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = {"data": np.full((2, 3072), i, np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(payload if payload and name == "data_batch_2" else pickle.dumps(data, protocol=2))


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (exec, ("open(__import__('os').environ['PWNED_MARK'], 'w').write('ran')",))


def test_cifar_checksums_and_code_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar(tmp_path / "good")
    folder = tmp_path / "good" / "cifar-10-batches-py"
    sums = [[name, hashlib.md5((folder / name).read_bytes()).hexdigest()] for name in sorted(os.listdir(folder))]
    with pytest.raises(FileNotFoundError, match="do not match torchvision's published md5"):
        check_data_available(DataConfig(name="cifar10", root=str(tmp_path / "good")))
    monkeypatch.setattr(torchvision_sets.tvd.CIFAR10, "train_list", [s for s in sums if s[0] != "test_batch"])
    monkeypatch.setattr(torchvision_sets.tvd.CIFAR10, "test_list", [s for s in sums if s[0] == "test_batch"])
    loaders = build_loaders(DataConfig(name="cifar10", root=str(tmp_path / "good"), batch_size=2), seed=0)
    assert loaders.spec.train_size == 10 and loaders.spec.test_size == 2

    mark = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARK", str(mark))
    _fake_cifar(tmp_path / "bad", payload=pickle.dumps({"data": _RunsCode(), "labels": [0]}, protocol=2))
    with pytest.raises(FileNotFoundError, match="data_batch_2 in .* do not match"):    # checked: refused unread
        check_data_available(DataConfig(name="cifar10", root=str(tmp_path / "bad")))
    refused = r"data_batch_2 is not a CIFAR batch \(it names (__builtin__|builtins).exec, and only numpy arrays"
    with pytest.raises(ValueError, match=refused):   # an unchecked copy: still never runs
        build_loaders(DataConfig(name="cifar10", root=str(tmp_path / "bad"), options={"verify": False}), seed=0)
    assert not mark.exists()


def test_failure_inside_a_run_is_one_line_and_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    error = RuntimeError("boom\nsecond line")
    try:
        raise error
    except RuntimeError as raised:
        raised.run_dir = str(tmp_path / "run")
        assert report_failure(raised, None) == 1
    line = capsys.readouterr().err
    log = tmp_path / "run" / "logs" / "rank0.log"
    assert line == f"error: RuntimeError: boom (full traceback: {log})\n"
    assert "Traceback" in log.read_text() and "second line" in log.read_text()
    # two ranks of one torchrun attempt: only the first to fail prints
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"test-{os.getpid()}-{tmp_path.name}")
    monkeypatch.setenv("RANK", "1")
    assert report_failure(ConfigError("train.x is bad"), None) == 2
    monkeypatch.setenv("RANK", "0")
    assert report_failure(ConfigError("train.x is bad"), None) == 2
    assert capsys.readouterr().err == "config error: train.x is bad\n"

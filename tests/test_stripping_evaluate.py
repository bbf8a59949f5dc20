"""``python -m launcher evaluate``: clean and corrupted accuracy of a finished run, on a small fake CIFAR-10.

A corruption file that holds the clean test images at every severity must score exactly the clean accuracy: the
corrupted images go through the run's own test pipeline. Missing files fail in one line naming the layout.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.run_config import load_config
from engine.trainer import train
from launcher.evaluate import evaluate, format_result

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Fake CIFAR-10 pickles; returns the test images as (N, 32, 32, 3) uint8 and their labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "test_batch", "rb") as handle:
        batch = pickle.load(handle)
    return batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch["labels"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("evaluate")
    images, labels = write_cifar10(tmp / "data")
    corrupt = tmp / "cifar10-c"
    corrupt.mkdir()
    np.save(corrupt / "labels.npy", np.tile(labels, 5))
    np.save(corrupt / "identity.npy", np.tile(images, (5, 1, 1, 1)))
    np.save(corrupt / "black.npy", np.zeros((5 * len(labels), 32, 32, 3), dtype=np.uint8))
    cfg = load_config(None, [f"output_dir={tmp}", "name=run", "data.name=cifar10", f"data.root={tmp / 'data'}",
                             "data.options.verify=false", "data.batch_size=25", "data.augment=none", "data.val_fraction=0.2",
                             "model.name=vit_strip", "model.options.dim=16", "model.options.depth=1",
                             "model.options.heads=2", "model.options.patch_size=8",
                             "sparsity.method=synaptic_stripping", "train.epochs=2", "train.device=cpu", "monitor.progress=false",
                             "monitor.tensorboard=false", "optim.name=adamw", "optim.lr=0.01"])
    summary = train(cfg)
    return tmp, corrupt, summary


def test_clean_and_corrupted_accuracy_of_a_run(run: tuple[Path, Path, dict]) -> None:
    tmp, corrupt, summary = run
    result = evaluate(str(tmp / "run"), str(corrupt), [])
    assert result["clean"]["acc"] == summary["test_acc"] and result["clean"]["samples"] == 30
    assert result["corruptions"]["identity"] == [summary["test_acc"]] * 5       # same pipeline as the clean set
    assert list(result["corruptions"]) == ["black", "identity"]
    every = result["corruptions"]["black"] + result["corruptions"]["identity"]
    assert result["mean_corruption_acc"] == pytest.approx(sum(every) / 10)
    assert result["mean_per_severity"][2] == pytest.approx((result["corruptions"]["black"][2] +
                                                            summary["test_acc"]) / 2)
    saved = json.loads((tmp / "run" / "robustness.json").read_text())
    assert saved["corruptions"] == result["corruptions"] and saved["checkpoint"].endswith(".pt")
    table = format_result(result)
    assert "identity" in table and "mean" in table and f"{100 * summary['test_acc']:.2f}" in table


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "launcher", "evaluate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_command_prints_and_missing_files_fail_in_one_line(run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    tmp, corrupt, _ = run
    done = _cli(str(tmp / "run" / "checkpoints"), "--corruptions", str(corrupt), "--output",
                str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "clean test accuracy" in done.stdout and (tmp_path / "out.json").is_file()
    (tmp_path / "empty").mkdir()
    failed = _cli(str(tmp / "run"), "--corruptions", str(tmp_path / "empty"))
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and "lacks labels.npy and <corruption>.npy" in failed.stderr
    missing = _cli(str(tmp_path / "nothing-here"))
    assert missing.returncode == 2 and "does not exist; pass a run directory" in missing.stderr

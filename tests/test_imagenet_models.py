"""ResNet-50 and ViT-S/16 at 224 px train a couple of steps on two CPU ranks under DDP and under DeepSpeed.

One torchrun launch per backend runs both models (tests/imagenet_probe.py): process start and imports cost more
than the steps. Synthetic 224 px data, micro-batch 2, two steps, static random masks (density 0.3): ranks must
finish with finite weights and identical masks of the configured density.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = {"resnet50": "model.name=resnet50,train.channels_last=true", "vit_s16": "model.name=vit_s16"}


def _base(tmp: Path) -> str:
    return ",".join([
        f"output_dir={tmp}", "data.name=synthetic", "data.image_size=224", "data.batch_size=2",
        "data.options.train_size=8", "data.options.test_size=4", "data.options.num_classes=10",
        "train.epochs=1", "train.max_steps_per_epoch=2", "train.device=cpu", "train.label_smoothing=0.1",
        "optim.name=sgd", "optim.lr=0.01", "sparsity.method=random", "sparsity.density=0.3",
        "monitor.progress=false", "monitor.tensorboard=false", "checkpoint.save_final=false",
    ])


def _launch(tmp: Path, backend: str, extra: str) -> dict[str, list[dict[str, Any]]]:
    """Both models under one torchrun launch; returns label -> per-rank records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    scenarios = [f"{m}:{_base(tmp)},name={backend}-{m},parallel.backend={backend}{extra},{o}"
                 for m, o in MODELS.items()]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/imagenet_probe.py", str(tmp), *scenarios],
                            cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return {m: [json.loads((tmp / f"{m}-rank{r}.json").read_text()) for r in range(2)] for m in MODELS}


@pytest.mark.parametrize("backend, extra", [("ddp", ""), ("deepspeed", ",parallel.zero_stage=1")])
def test_imagenet_models_train_under_backend(tmp_path: Path, backend: str, extra: str) -> None:
    for model, ranks in _launch(tmp_path, backend, extra).items():
        for record in ranks:
            summary = record["summary"]
            assert summary["steps"] == 2 and summary["world_size"] == 2, (model, summary)
            assert record["finite"], model
            assert summary["test_loss"] == summary["test_loss"] and summary["test_loss"] > 0, (model, summary)
            assert summary["density"] == pytest.approx(0.3, abs=1e-3), (model, summary)
        assert ranks[0]["mask_hash"] == ranks[1]["mask_hash"] and ranks[0]["mask_sum"] == ranks[1]["mask_sum"]


def test_compile_trains_like_eager(tmp_path: Path) -> None:
    """train.compile=true (torch.compile of the training forward) follows the eager run's loss curve."""
    from engine.run_config import load_config
    from engine.trainer import train

    base = [f"output_dir={tmp_path}", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[32]",
            "train.epochs=1", "train.max_steps_per_epoch=3", "train.device=cpu", "monitor.progress=false",
            "monitor.tensorboard=false", "checkpoint.save_final=false", "sparsity.method=random",
            "sparsity.density=0.5"]
    eager = train(load_config(None, base + ["name=eager"]))
    compiled = train(load_config(None, base + ["name=compiled", "train.compile=true"]))
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-4)
    assert compiled["density"] == eager["density"]


def test_compile_is_refused_with_deepspeed() -> None:
    from engine.config import ConfigError
    from engine.run_config import load_config

    with pytest.raises((ConfigError, ValueError), match="train.compile is not supported with parallel.backend"):
        load_config(None, ["train.compile=true", "parallel.backend=deepspeed"])

"""Every YAML under configs/ loads into a checked RunConfig, and its model builds at its data set's shape."""

from __future__ import annotations

from pathlib import Path

import pytest

import models
from engine.data import data_shape
from engine.run_config import load_config

REPO = Path(__file__).resolve().parents[1]
# run configs; configs/sweeps/ holds sweep files, checked by tests/test_tune_spec.py
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.relative_to(REPO).parts)


def test_configs_are_found() -> None:
    assert len(CONFIGS) >= 13 and any("synflow" in str(p) for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads_and_builds_its_model(path: Path) -> None:
    cfg = load_config(str(path))
    shape = data_shape(cfg.data)
    model = models.build_model(cfg.model.name, in_channels=shape.channels, image_size=shape.image_size,
                               num_classes=shape.num_classes, **cfg.model.options)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_synflow_configs_follow_the_paper_recipe() -> None:
    for path in CONFIGS:
        if path.parent.name != "synflow":
            continue
        cfg = load_config(str(path))
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.nesterov, cfg.optim.weight_decay) == ("sgd", 0.1, True, 1e-4)
        assert (cfg.lr_schedule.name, cfg.lr_schedule.milestones, cfg.lr_schedule.gamma) == ("step", [60, 120], 0.1)
        assert (cfg.train.epochs, cfg.data.batch_size) == (160, 128)
        assert cfg.sparsity.method == "synflow" and cfg.sparsity.iterations == 100


def test_imagenet_recipes() -> None:
    """Total batch 256 (ResNet) or 1024 (ViT) on 8 ranks, the schedules docs/experiments.md describes, bf16."""
    recipes = {p.stem: load_config(str(p)) for p in CONFIGS if p.parent.name == "imagenet"}
    assert set(recipes) == {"resnet50_dense_cosine", "resnet50_static_erk80_cosine", "resnet50_dense_step",
                            "resnet50_static_erk80_step", "vit_s16", "vit_b16"}
    for name, cfg in recipes.items():
        assert cfg.train.precision == "bf16" and cfg.data.image_size == 224
        if name.startswith("resnet50"):
            assert cfg.data.batch_size * 8 == 256 and cfg.train.channels_last and cfg.optim.lr == 0.1
            if name.endswith("cosine"):
                assert (cfg.lr_schedule.name, cfg.train.epochs, cfg.train.label_smoothing) == ("cosine", 90, 0.1)
            else:
                assert (cfg.lr_schedule.name, cfg.lr_schedule.milestones, cfg.train.epochs) == (
                    "step", [30, 60, 90], 100)
            sparse = "static" in name
            assert cfg.sparsity.method == ("random" if sparse else "dense")
            if sparse:
                assert (cfg.sparsity.density, cfg.sparsity.distribution) == (0.2, "erk")
        else:
            assert (cfg.optim.name, cfg.lr_schedule.name, cfg.data.augment) == ("adamw", "cosine", "autoaugment")
            assert cfg.lr_schedule.warmup_epochs > 0 and cfg.train.label_smoothing == 0.1


def test_dsr_recipes() -> None:
    """The DSR paper's set-ups: WRN-28-2 on CIFAR-10 for every method, ResNet-50 on ImageNet at 80/90%, MNIST MLP."""
    recipes = {p.stem: load_config(str(p)) for p in CONFIGS if p.parent.name == "dsr"}
    wrn = {name: cfg for name, cfg in recipes.items() if name.startswith("wrn28_2_")}
    assert {n.removeprefix("wrn28_2_") for n in wrn} == {"dsr", "set", "deep_r", "static", "hashednet", "iterative"}
    for name, cfg in wrn.items():
        assert cfg.model.name == "wrn28_2" and cfg.data.name == "cifar10" and cfg.data.batch_size == 100
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (
            "sgd", 0.1, 0.9, True, 5e-4)
        assert (cfg.lr_schedule.name, cfg.lr_schedule.milestones, cfg.lr_schedule.gamma, cfg.train.epochs) == (
            "step", [60, 120, 160], 0.2, 200)
        assert cfg.sparsity.targets.exclude_roles == ["stem", "shortcut", "classifier"], name
        assert cfg.sparsity.density == 0.1, name
    for name in ("dsr", "set"):
        sparsity = wrn[f"wrn28_2_{name}"].sparsity
        assert (sparsity.period_epochs, sparsity.periods) == ([0, 25, 80, 140], [100, 200, 400, 800])
    assert wrn["wrn28_2_dsr"].sparsity.target_pruned == 20000 and wrn["wrn28_2_set"].sparsity.drop_fraction == 0.138
    for pct, density in ((80, 0.2), (90, 0.1)):
        cfg = recipes[f"resnet50_dsr_s{pct}"]
        assert (cfg.model.name, cfg.data.name, cfg.data.batch_size * 8, cfg.train.epochs) == (
            "resnet50", "imagenet", 256, 100)
        assert (cfg.sparsity.method, cfg.sparsity.density, cfg.sparsity.target_pruned) == ("dsr", density, 400000)
        assert cfg.sparsity.targets.exclude_roles == ["stem", "shortcut"]       # the FC is sparse in ResNet-50
    assert recipes["mlp_mnist_dsr"].model.name == "lenet_300_100" and recipes["mlp_mnist_dsr"].data.name == "mnist"

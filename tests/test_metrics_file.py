"""What a run records for later study: metrics.csv and mask_updates.csv in the run directory (resume-safe), the
TensorBoard events of mask changes, churn and lr, top-5 accuracy, ever-active weights of dynamic methods and FLOPs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.backends import DistEnv, build_backend, pick_device
from engine.checkpoint import load_state
from engine.run_config import load_config
from engine.trainer import Trainer, train

SMALL = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[32]",
         "optim.lr=0.05", "monitor.progress=false", "train.max_steps_per_epoch=6", "lr_schedule.name=cosine"]
SET = ["sparsity.method=set", "sparsity.density=0.2", "sparsity.period=2", "sparsity.drop_fraction=0.3"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(tb_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def set_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("runs")
    summary = train(load_config(None, [*SMALL, *SET, f"output_dir={out}", "name=set", "train.epochs=2",
                                       "monitor.log_every_steps=1", "checkpoint.keep=5"]))
    return summary, Path(summary["run_dir"])


def test_metrics_csv_one_row_per_epoch(set_run: tuple[dict, Path]) -> None:
    summary, run_dir = set_run
    rows = _rows(run_dir / "metrics.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "6"), ("2", "12")]
    assert list(rows[0]) == ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5",
                             "val_loss", "val_acc", "val_top5", "density", "lr", "samples_per_s"]
    assert float(rows[-1]["test_acc"]) == summary["test_acc"] and float(rows[-1]["test_loss"]) == summary["test_loss"]
    assert rows[-1]["test_top5"] == "" and rows[-1]["val_acc"] == ""     # 10 classes, no validation split
    assert float(rows[-1]["density"]) == pytest.approx(summary["density"])
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-12)       # cosine ends at zero
    assert all(float(r["samples_per_s"]) > 0 and 0 <= float(r["train_acc"]) <= 1 for r in rows)


def test_mask_updates_and_tensorboard_events(set_run: tuple[dict, Path]) -> None:
    summary, run_dir = set_run
    updates = _rows(run_dir / "mask_updates.csv")
    assert [int(r["step"]) for r in updates] == [0, 2, 4, 6, 8, 10, 12]     # the start, then every period
    assert [int(r["epoch"]) for r in updates] == [0, 0, 0, 0, 1, 1, 1]
    scalars = _scalars(run_dir / "tensorboard")
    layers = list(summary["layers"])
    kept = {name: summary["layers"][name]["kept"] for name in layers}
    for row in updates[1:]:
        step = int(row["step"])
        grown = sum(dict(scalars[f"method/dst/grown/{n}"])[step] for n in layers)
        assert float(row["regrown"]) == pytest.approx(grown / sum(kept.values()))   # SET conserves each layer
        assert dict(scalars["churn/regrown"])[step] == pytest.approx(grown / sum(kept.values()))
        for name in layers:
            assert dict(scalars[f"churn/regrown/{name}"])[step] == pytest.approx(
                dict(scalars[f"method/dst/grown/{name}"])[step] / kept[name])
    # churn at its own step, not repeated at epoch ends; density at every change, once per step
    assert [s for s, _ in scalars[f"method/dst/grown/{layers[0]}"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in scalars[f"sparsity/layer/{layers[0]}"]] == [0, 2, 4, 6, 8, 10, 12]
    assert [s for s, _ in scalars["lr"]] == list(range(1, 13))
    assert dict(scalars["hparams/test_acc"]) == {12: pytest.approx(summary["test_acc"])}


def test_ever_active_fraction_in_summary_and_checkpoint(set_run: tuple[dict, Path]) -> None:
    summary, run_dir = set_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    state = load_state(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1].as_posix())
    ever = state["method"]["ever_active"]
    for name, layer in on_disk["layers"].items():
        assert layer["target"] == pytest.approx(0.2, abs=0.01)
        assert layer["ever_active"] == int(ever[name].sum()) / ever[name].numel()
        assert bool((ever[name] | ~state["masks"][name]).all())          # every active weight was ever active
        assert layer["kept"] / layer["numel"] < layer["ever_active"] <= 1.0
    flops = on_disk["flops"]
    dense = {n: f["dense_flops"] for n, f in flops["layers"].items()}
    assert set(dense) == set(on_disk["layers"])
    # an MLP is all prunable Linear weights: relative FLOPs = weight-weighted density, constant under SET
    expected = sum(dense[n] * on_disk["layers"][n]["kept"] / on_disk["layers"][n]["numel"] for n in dense)
    assert flops["inference_flops"] == pytest.approx(expected)
    assert flops["training_relative"] == pytest.approx(flops["inference_relative"])
    assert flops["training_flops"] == pytest.approx(3 * flops["inference_flops"])


def test_ever_active_is_the_union_of_masks_seen() -> None:
    from pruning.methods import MethodContext, build_method
    from pruning.methods.dst import SETConfig

    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = build_method(SETConfig(method="set", density=0.25, period=1), model, optimizer,
                          MethodContext(steps_per_epoch=4, epochs=1))
    method.setup()
    union = method.masks["0.weight"].clone()
    for step in range(3):
        model[0].weight.grad = torch.randn_like(model[0].weight)
        method.before_step(step)
        optimizer.step()
        method.after_step(step)
        union |= method.masks["0.weight"]
        assert torch.equal(method.ever_active["0.weight"], union)
    assert method.ever_active_fraction() == {"0.weight": int(union.sum()) / 64}
    restored = build_method(SETConfig(method="set", density=0.25, period=1), model, optimizer,
                            MethodContext(steps_per_epoch=4, epochs=1))
    restored.masks.load_state_dict(method.masks.state_dict())
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.ever_active["0.weight"], union)


def test_resumed_run_keeps_one_row_per_epoch_and_step(tmp_path: Path) -> None:
    common = [*SMALL, "sparsity.method=gradual", "sparsity.schedule.name=linear", "sparsity.schedule.start=0",
              "sparsity.schedule.end=12", "sparsity.schedule.prune_freq=3", "sparsity.schedule.final_sparsity=0.8",
              f"output_dir={tmp_path}", "name=res", "checkpoint.keep=5", "train.epochs=3"]
    first = train(load_config(None, common))
    run_dir = Path(first["run_dir"])
    full_metrics = _rows(run_dir / "metrics.csv")
    full_updates = _rows(run_dir / "mask_updates.csv")
    checkpoint = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[0]      # after epoch 1 (step 6)
    train(load_config(None, [*common, f"resume={checkpoint}"]))
    metrics = _rows(run_dir / "metrics.csv")
    updates = _rows(run_dir / "mask_updates.csv")
    assert [r["epoch"] for r in metrics] == ["1", "2", "3"]
    assert [r["step"] for r in updates] == [r["step"] for r in full_updates]
    assert len({r["step"] for r in updates}) == len(updates)
    assert [r["density"] for r in updates] == [r["density"] for r in full_updates]   # the same schedule again
    assert metrics[-1]["test_acc"] == full_metrics[-1]["test_acc"]                    # exact resume
    densities = [float(r["density"]) for r in updates]
    assert densities[0] == 1.0 and densities[-1] == pytest.approx(0.2, abs=0.01)
    assert all(r["regrown"] in ("", "0.0") for r in updates)                       # pruning only grows nothing
    summary = json.loads((run_dir / "summary.json").read_text())
    # training FLOPs average the forward over the steps: dense early on, so above the final masks' inference cost
    timeline = [(int(r["step"]), float(r["forward_flops"])) for r in updates]
    mean = sum(f * (b - a) for (a, f), (b, _) in zip(timeline, [*timeline[1:], (18, 0.0)])) / 18
    assert summary["flops"]["training_flops"] == pytest.approx(3 * mean)
    assert summary["flops"]["training_relative"] > summary["flops"]["inference_relative"]


def test_top5_for_100_classes(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=synthetic", "data.options.num_classes=100", "data.options.channels=1",
                             "data.options.image_size=8", "data.options.train_size=256", "data.options.test_size=200",
                             "data.batch_size=64", "model.name=mlp", "model.options.hidden=[16]",
                             "monitor.progress=false", "monitor.tensorboard=false", "train.epochs=1",
                             f"output_dir={tmp_path}", "name=top5"])
    env = DistEnv()
    backend = build_backend(cfg.parallel, env, pick_device(cfg.train.device, env), cfg.train.precision)
    trainer = Trainer(cfg, backend)
    try:
        result = trainer.evaluate()
        hits = correct = seen = 0
        trainer.model.eval()
        with torch.no_grad():
            for inputs, targets in trainer.loaders.test:
                outputs = trainer.model(trainer.batches.inputs(inputs))
                ranked = outputs.argsort(dim=1, descending=True)
                hits += sum(int(t in r[:5]) for t, r in zip(targets.tolist(), ranked.tolist()))
                correct += int((ranked[:, 0] == targets).sum())
                seen += len(targets)
        assert seen == 200 and result["top5"] == hits / seen and result["acc"] == correct / seen
        assert result["top5"] >= result["acc"]
        summary = trainer.fit()
    finally:
        trainer.close()
        backend.shutdown()
    assert 0 <= summary["test_acc"] <= summary["test_top5"] <= 1
    row = _rows(tmp_path / "top5" / "metrics.csv")[-1]
    assert float(row["test_top5"]) == summary["test_top5"]

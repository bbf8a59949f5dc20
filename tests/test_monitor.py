"""Monitor: TensorBoard events readable by TensorBoard itself, silent disabled ranks, and the end-of-run summary."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.monitor import Monitor, MonitorConfig, format_summary


def _read_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard would show: tag -> [(step, value)]."""
    accumulator = EventAccumulator(tb_dir)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_and_errors_start_with_field_name() -> None:
    assert MonitorConfig() == MonitorConfig(tensorboard=True, progress=True, log_every_steps=10)
    for kwargs, field in [({"log_every_steps": 0}, "log_every_steps"), ({"log_every_steps": 2.0}, "log_every_steps"),
                          ({"tensorboard": "no"}, "tensorboard"), ({"progress": 1}, "progress")]:
        with pytest.raises(ValueError) as info:
            MonitorConfig(**kwargs)
        assert str(info.value).startswith(field + " ") and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ TensorBoard


def test_scalars_land_in_event_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    monitor = Monitor(str(run_dir), enabled=True, progress=False)
    assert monitor.tensorboard_dir == str(run_dir / "tensorboard")
    for step in range(3):
        monitor.scalars({"train/loss": 1.0 / (step + 1), "sparsity/density/layer1.0.conv1.weight": 0.1 * step},
                        step=step * 10)
    monitor.flush()
    scalars = _read_scalars(monitor.tensorboard_dir)  # readable while the run is still going
    assert [s for s, _ in scalars["train/loss"]] == [0, 10, 20]
    monitor.scalars({"test/acc": 0.5}, step=30)
    monitor.close()
    monitor.close()  # idempotent

    scalars = _read_scalars(str(run_dir / "tensorboard"))
    assert set(scalars) == {"train/loss", "sparsity/density/layer1.0.conv1.weight", "test/acc"}
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert scalars["sparsity/density/layer1.0.conv1.weight"][2] == (20, pytest.approx(0.2))
    assert scalars["test/acc"] == [(30, 0.5)]
    monitor.scalars({"late/value": 1.0}, step=99)  # after close: ignored, no crash


def test_remote_run_dir_written_in_place_with_no_temporary_folder(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))     # a temporary folder would show up here
    run_dir = f"memory://sparsetrain-monitor-{uuid.uuid4().hex}/run"
    monitor = Monitor(run_dir, enabled=True, progress=False)
    assert monitor.tensorboard_dir == f"{run_dir}/tensorboard"
    monitor.scalars({"train/loss": 2.0}, step=1)
    monitor.flush()
    assert _read_scalars(monitor.tensorboard_dir)["train/loss"] == [(1, 2.0)]   # there before close: a crash keeps it
    monitor.scalars({"train/loss": 1.0}, step=2)
    monitor.close()
    assert _read_scalars(f"{run_dir}/tensorboard")["train/loss"] == [(1, 2.0), (2, 1.0)]
    assert _all_files(tmp_path) == []
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.rm(path.rsplit("/", 1)[0], recursive=True)


def test_hparams_row_and_custom_scalars_layout(tmp_path: Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    monitor = Monitor(str(tmp_path / "run"), enabled=True, progress=False)
    monitor.hparams_start({"method": "rigl", "sparsity.density": 0.1, "sparsity.stop_epoch": None,
                           "sparsity.periods": [1, 2], "seed": 3, "nesterov": True})
    monitor.custom_scalars({"density": {"fc.weight": ("Multiline", ["^sparsity/layer/fc\\.weight$",
                                                                    "^sparsity/target/fc\\.weight$"])}})
    monitor.hparams_end({"test_acc": 0.75}, step=12)
    monitor.close()
    accumulator = EventAccumulator(monitor.tensorboard_dir)
    accumulator.Reload()
    hparams = accumulator.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values == {"method": "rigl", "sparsity.density": 0.1, "sparsity.stop_epoch": "none",
                      "sparsity.periods": "[1, 2]", "seed": 3.0, "nesterov": True}
    end = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_end_info"]).session_end_info
    assert end.status == 1     # STATUS_SUCCESS
    assert "_hparams_/experiment" not in hparams   # the plugin builds the table from every run's session records
    assert [(e.step, e.value) for e in accumulator.Scalars("hparams/test_acc")] == [(12, 0.75)]
    assert list(accumulator.PluginTagToContent("custom_scalars")) == ["custom_scalars__config__"]
    stored = accumulator.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(stored)
    chart = layout.category[0].chart[0]
    assert (layout.category[0].title, chart.title) == ("density", "fc.weight")
    assert list(chart.multiline.tag) == ["^sparsity/layer/fc\\.weight$", "^sparsity/target/fc\\.weight$"]


# ------------------------------------------------------------------------------------------------ CSV tables


def test_table_rows_rewrite_and_resume_without_duplicates(tmp_path: Path) -> None:
    columns = ("epoch", "loss", "acc")
    first = Monitor(str(tmp_path), enabled=True, tensorboard=False, progress=False)
    first.table_rows("metrics.csv", [], columns=columns, key="epoch", since=0)
    assert not (tmp_path / "metrics.csv").exists()          # no rows, no file
    for epoch in (1, 2, 3):
        first.table_rows("metrics.csv", [{"epoch": epoch, "loss": 1.0 / epoch}], columns=columns, key="epoch",
                         since=0)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,loss,acc", "1,1.0,", "2,0.5,", f"3,{1 / 3!r},"]
    # a run resumed from its epoch-2 checkpoint: epoch 3 is trained again and must not appear twice
    resumed = Monitor(str(tmp_path), enabled=True, tensorboard=False, progress=False)
    resumed.table_rows("metrics.csv", [{"epoch": 3, "loss": 0.25, "acc": 0.5}], columns=columns, key="epoch",
                       since=2)
    resumed.table_rows("metrics.csv", [{"epoch": 4, "loss": 0.125}], columns=columns, key="epoch", since=2)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,loss,acc", "1,1.0,", "2,0.5,", "3,0.25,0.5", "4,0.125,"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]     # no temporary file left
    silent = Monitor(str(tmp_path / "other"), enabled=False)
    silent.table_rows("metrics.csv", [{"epoch": 1}], columns=columns, key="epoch", since=0)
    assert not (tmp_path / "other").exists()


def test_tensorboard_off_creates_nothing(tmp_path: Path) -> None:
    monitor = Monitor(str(tmp_path / "run"), enabled=True, tensorboard=False, progress=False)
    monitor.scalars({"train/loss": 1.0}, step=0)
    monitor.close()
    assert monitor.tensorboard_dir is None
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ disabled ranks


def test_disabled_monitor_is_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    monitor = Monitor(str(run_dir), enabled=False, tensorboard=True, progress=True)
    assert monitor.tensorboard_dir is None
    monitor.scalars({"train/loss": 1.0}, step=0)
    with monitor.progress(total=5, desc="epoch 1") as bar:
        for _ in range(5):
            bar.update()
            bar.set_postfix({"loss": 0.5})
    monitor.print("hello from rank 1")
    monitor.flush()
    monitor.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not run_dir.exists() and _all_files(tmp_path) == []


# ------------------------------------------------------------------------------------------------ console


def test_enabled_progress_and_print(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monitor = Monitor(str(tmp_path / "run"), enabled=True, tensorboard=False, progress=True)
    with monitor.progress(total=3, desc="epoch 1") as bar:
        bar.update()
        bar.set_postfix({"loss": 0.25, "lr": 0.1})
        monitor.print("mid-epoch line")
        bar.update(2)
    monitor.close()
    captured = capsys.readouterr()
    assert "mid-epoch line" in captured.out
    assert "epoch 1" in captured.err  # the bar itself goes to stderr


def test_progress_disabled_by_flag_prints_no_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monitor = Monitor(str(tmp_path), enabled=True, tensorboard=False, progress=False)
    with monitor.progress(total=2, desc="epoch 1") as bar:
        bar.update(2)
    monitor.print("done")
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "done\n"


# ------------------------------------------------------------------------------------------------ summary


def test_format_summary_numbers_and_locations() -> None:
    layers = [("conv1.weight", 1728, 173), ("layer1.0.conv1.weight", 36864, 3686), ("fc.weight", 5120, 0)]
    text = format_summary({"test_acc": 0.91234, "best_acc": 0.9187, "best_epoch": 57, "epochs": 60,
                           "wall_time_s": 1234.56789}, layers, "/runs/resnet20", "/runs/resnet20/tensorboard")
    assert "91.23%" in text and "91.87% (epoch 57)" in text
    total, nonzero = 1728 + 36864 + 5120, 173 + 3686
    assert f"{nonzero / total:.4f}" in text and f"{nonzero:,} of {total:,}" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["layer1.0.conv1.weight"] == ["36,864", "3,686", "0.1000"]
    assert rows["fc.weight"] == ["5,120", "0", "0.0000"]
    assert rows["total"] == [f"{total:,}", f"{nonzero:,}", f"{nonzero / total:.4f}"]
    assert "epochs          60" in text and "1234.57" in text
    assert "/runs/resnet20/checkpoints" in text and "/runs/resnet20/config.yaml" in text
    assert "tensorboard --logdir /runs/resnet20/tensorboard" in text


def test_format_summary_explicit_density_paths_and_no_tensorboard() -> None:
    text = format_summary({"test_acc": 0.5, "density": 0.05}, [("w", 10, 1)], "s3://bucket/run", None,
                          checkpoint_dir="s3://bucket/ckpts", config_path="s3://bucket/run/resolved.yaml")
    assert "global density  0.0500" in text  # the reported value wins over the layer sum
    assert "s3://bucket/ckpts" in text and "resolved.yaml" in text
    assert "tensorboard --logdir" not in text and "off" in text
    assert "best accuracy   n/a" in text


def test_format_summary_quotes_paths_with_spaces() -> None:
    text = format_summary({}, [], "/my runs/a", "/my runs/a/tensorboard")
    assert "tensorboard --logdir '/my runs/a/tensorboard'" in text


def test_format_summary_elides_long_layer_lists() -> None:
    layers = [(f"blocks.{i}.weight", 100, 10) for i in range(100)]
    text = format_summary({"test_acc": 0.7}, layers, "/r", "/r/tensorboard")
    shown = [line for line in text.splitlines() if "blocks." in line]
    assert len(shown) <= 40
    assert "blocks.0.weight" in text and "blocks.99.weight" in text and "blocks.50.weight" not in text
    assert f"({100 - len(shown)} more layers elided)" in text
    assert "10,000" in text and "1,000" in text  # totals still cover every layer

    short = format_summary({}, layers[:40], "/r", None)
    assert "elided" not in short and "blocks.39.weight" in short


def test_run_summary_shows_flops_and_top5_in_one_line_each() -> None:
    from engine.monitor import format_run_summary

    summary = {"test_acc": 0.5, "best_test_acc": 0.6, "test_top5": 0.875, "density": 0.1, "run_dir": "/r",
               "layers": {"fc.weight": {"numel": 100, "kept": 10, "nonzero": 10}},
               "flops": {"inference_relative": 0.125, "inference_flops": 2500.0, "training_relative": 0.25,
                         "layers": {"fc.weight": {"dense_flops": 200, "relative": 0.1}}}}
    text = format_run_summary(summary, "/r", None)
    assert "  test_top5       87.50%" in text
    assert "  flops           inference 12.5% of dense (2.5e+03 per sample), training 25.0% of dense" in text
    assert "dense_flops" not in text

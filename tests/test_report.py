"""``launcher report``: the table and plots across real tiny runs, where it writes, and its one-line errors; the
layer-collapse plot of ``launcher prune``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from engine.run_config import load_config
from engine.trainer import train
from launcher import report as report_module
from launcher.cli import main

TINY = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[32]", "optim.lr=0.05",
        "monitor.progress=false", "monitor.tensorboard=false", "train.max_steps_per_epoch=4", "train.epochs=1",
        "checkpoint.save_final=false"]
RUNS = {
    "mag05": ["sparsity.method=magnitude", "sparsity.density=0.05"],
    "mag10": ["sparsity.method=magnitude", "sparsity.density=0.1"],
    "mag20": ["sparsity.method=magnitude", "sparsity.density=0.2"],
    "set10": ["sparsity.method=set", "sparsity.density=0.1", "sparsity.period=2"],
    "gradual": ["sparsity.method=gradual", "sparsity.schedule.name=linear", "sparsity.schedule.start=0",
                "sparsity.schedule.end=4", "sparsity.schedule.prune_freq=2", "sparsity.schedule.final_sparsity=0.9"],
}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("report") / "runs"
    summaries = {name: train(load_config(None, [*TINY, *extra, f"output_dir={out}", f"name={name}"]))
                 for name, extra in RUNS.items()}
    return out, summaries


def _table(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


def test_report_across_runs_writes_csv_and_plots(runs: tuple[Path, dict[str, dict[str, Any]]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out, summaries = runs
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    report_dir = out / "report"
    assert f"report written to {report_dir}" in printed
    table = _table(report_dir / "runs.csv")
    assert set(table) == set(RUNS)
    for name, summary in summaries.items():
        row = table[name]
        assert (row["method"], row["model"], row["data"]) == (summary["method"], "mlp", "digits")
        assert float(row["density"]) == summary["density"] and float(row["final_acc"]) == summary["test_acc"]
        assert float(row["best_acc"]) == summary["best_test_acc"] and int(row["epochs"]) == 1
        assert float(row["inference_flops"]) == summary["flops"]["inference_relative"]
        assert float(row["wall_time_s"]) == summary["wall_time_s"] and row["run_dir"] == summary["run_dir"]
        assert f"{100 * summary['test_acc']:.2f}%" in printed
    assert float(table["mag05"]["density"]) == pytest.approx(0.05, abs=1e-3)
    written = sorted(p.name for p in report_dir.iterdir())
    assert written == sorted(["runs.csv", "accuracy_vs_density.png", "density_gradual.png", "regrown_set10.png",
                              *(f"layers_{name}.png" for name in RUNS)])
    for name in written:
        if name.endswith(".png"):
            assert (report_dir / name).read_bytes()[:8] == PNG, name
    # a second report never overwrites the first; one run's report goes inside it
    loaded = [report_module.load_run(str(out / name)) for name in RUNS]
    assert report_module.default_out(loaded) == f"{out}/report-2"
    assert report_module.default_out(loaded[:1]) == f"{out}/mag05/report"


def test_glob_and_single_run(runs: tuple[Path, dict[str, dict[str, Any]]], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out, summaries = runs
    assert main(["report", str(out / "mag*"), "--out", str(tmp_path / "mags")]) == 0
    assert set(_table(tmp_path / "mags" / "runs.csv")) == {"mag05", "mag10", "mag20"}
    capsys.readouterr()
    assert main(["report", str(out / "set10"), "--out", str(tmp_path / "one")]) == 0
    printed = capsys.readouterr().out
    assert "sparsetrain run summary" in printed and "flops" in printed       # the one-run summary, then the table
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["layers_set10.png", "regrown_set10.png",
                                                                  "runs.csv"]
    assert main(["report", str(out / "set10"), "--out", str(tmp_path / "one")]) == 2      # never overwrites
    assert capsys.readouterr().err.count("\n") == 1


def test_plot_contents(runs: tuple[Path, dict[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    out, summaries = runs
    figures: dict[str, Any] = {}
    monkeypatch.setattr(report_module, "_save", lambda figure, url: figures.setdefault(url, figure) and url)
    loaded = [report_module.load_run(str(out / name)) for name in RUNS]
    report_module._name_runs(loaded)
    report_module.plot_accuracy_vs_density(loaded, "acc.png")
    lines = {line.get_label(): line for line in figures["acc.png"].axes[0].get_lines()}
    mags = [summaries[n] for n in ("mag05", "mag10", "mag20")]
    assert list(lines["magnitude"].get_xdata()) == [s["density"] for s in mags]
    assert list(lines["magnitude"].get_ydata()) == pytest.approx([100 * s["test_acc"] for s in mags])
    set_run = next(run for run in loaded if run.name == "set10")
    report_module.plot_layers(set_run, "layers.png")
    axes = figures["layers.png"].axes[0]
    layers = summaries["set10"]["layers"]
    assert [bar.get_height() for bar in axes.patches] == pytest.approx([v["kept"] / v["numel"]
                                                                       for v in layers.values()])
    marks = {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}
    assert marks["target"] == pytest.approx([v["target"] for v in layers.values()])
    assert marks["ever active"] == pytest.approx([v["ever_active"] for v in layers.values()])


def test_bad_run_directories_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("report error: ") and err.count("\n") == 1 and "summary.json" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text('{"test_acc": 0.5, ')
    assert main(["report", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "not a readable run summary" in err and err.count("\n") == 1
    (broken / "summary.json").write_text(json.dumps({"test_acc": 0.5}))
    assert main(["report", str(broken)]) == 2
    assert "lacks the field(s) density, method" in capsys.readouterr().err
    assert not (broken / "report").exists()


def test_prune_writes_its_layer_collapse_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    figures: dict[str, Any] = {}
    real_save = report_module._save
    monkeypatch.setattr(report_module, "_save", lambda figure, url: figures.setdefault(url, figure)
                        and real_save(figure, url))
    output = tmp_path / "collapse.json"
    assert main(["prune", "data.name=digits", "model.name=mlp", "model.options.hidden=[32]",
                 "--methods", "magnitude,random", "--compressions", "0,1,2,3", "--output", str(output)]) == 0
    assert f"layer-collapse plot written to {tmp_path / 'collapse.png'}" in capsys.readouterr().out
    assert (tmp_path / "collapse.png").read_bytes()[:8] == PNG
    result = json.loads(output.read_text())
    figure = figures[str(tmp_path / "collapse.png")]
    assert [axis.get_title() for axis in figure.axes] == ["magnitude", "random"]
    first_layer = next(iter(result["prunable"]))
    line = figure.axes[0].get_lines()[0]
    densities = [run["layers"][first_layer]["density"] for run in result["methods"]["magnitude"]["runs"]]
    assert list(line.get_xdata()) == [0, 1, 2, 3]
    floor = min(v for v in line.get_ydata())
    assert list(line.get_ydata()) == pytest.approx([d if d > 0 else floor for d in densities])

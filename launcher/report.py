"""``python -m launcher report RUN_DIR [RUN_DIR ...]``: a table and plots across finished runs.

Each argument is a run directory (it holds summary.json), a directory whose sub-directories are runs, or a glob of
either (quote it: ``'runs/quickstart*'``); paths or fsspec URLs. The command prints the table (method, model, data,
density, best and final accuracy, top-5 where measured, epochs, time, FLOPs relative to dense) and writes it as
``runs.csv`` with PNG plots into a new directory that it names:

- ``accuracy_vs_density.png``: final (filled) and best (hollow) test accuracy against density, one line per method
  (two runs or more);
- ``layers_<run>.png``: each layer's density against its target (where the method has one) and, for dynamic methods,
  the fraction of each layer ever active;
- ``density_<run>.png``: global density over training steps, for runs whose masks changed density (schedules);
- ``regrown_<run>.png``: for dynamic methods, the fraction of active weights regrown at each mask update.

The data come from each run's summary.json, metrics.csv and mask_updates.csv. Given one run, the command also prints
that run's end-of-run summary. Nothing is overwritten: the default output is ``report`` (``report-2``, ...) next to
the runs (in the run directory itself for one run); ``--out`` must name a directory that does not exist yet.

``launcher prune`` draws its layer-collapse plot with :func:`plot_layer_collapse`.

Modules that import torch, numpy, fsspec or matplotlib are imported inside functions: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.urls import join_url

HELP = "a table and plots across finished runs (CSV and PNG)"
TABLE_COLUMNS = ("run", "method", "model", "data", "density", "best_acc", "final_acc", "top5", "epochs", "steps",
                 "wall_time_s", "inference_flops", "training_flops", "run_dir")
_GLOB_CHARS = re.compile(r"[*?\[]")


class ReportError(Exception):
    """Bad input to the report: the message is the one line the user sees."""


@dataclass
class Run:
    """One finished run: where it is, what its summary says, and its per-epoch and per-update tables."""

    url: str
    summary: dict[str, Any]
    name: str = ""
    metrics: list[dict[str, str]] = field(default_factory=list)
    mask_updates: list[dict[str, str]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """This run's row of the table (None where the run did not record the value)."""
        s = self.summary
        flops = s.get("flops") or {}
        return {"run": self.name, "method": s.get("method"), "model": s.get("model"), "data": s.get("data"),
                "density": s.get("density"), "best_acc": s.get("best_test_acc"), "final_acc": s.get("test_acc"),
                "top5": s.get("test_top5"), "epochs": s.get("epochs"), "steps": s.get("steps"),
                "wall_time_s": s.get("wall_time_s"), "inference_flops": flops.get("inference_relative"),
                "training_flops": flops.get("training_relative"), "run_dir": self.url}


# ------------------------------------------------------------------------------------------------ finding runs



def _url(fs: Any, path: str) -> str:
    """A path fsspec returned, as a URL of its file system (a plain path for local files)."""
    return path if fs.protocol in ("file", "local") or "file" in fs.protocol else fs.unstrip_protocol(path)


def find_runs(arguments: Sequence[str]) -> list[str]:
    """Run directories named by ``arguments`` (runs, parents of runs, globs), in order, each once."""
    from fsspec.core import url_to_fs

    found: list[str] = []
    for argument in arguments:
        fs, path = url_to_fs(argument)
        candidates = ([_url(fs, p) for p in sorted(fs.glob(path))] if _GLOB_CHARS.search(path)
                      else [argument.rstrip("/") or argument])
        runs = []
        for candidate in candidates:
            cfs, cpath = url_to_fs(candidate)
            if cfs.exists(join_url(cpath, "summary.json")):
                runs.append(candidate.rstrip("/"))
            elif cfs.isdir(cpath):
                inside = [_url(cfs, p.rsplit("/", 1)[0]) for p in sorted(cfs.glob(join_url(cpath, "*/summary.json")))]
                unfinished = [_url(cfs, p.rsplit("/", 1)[0]) for p in sorted(cfs.glob(join_url(cpath, "*/config.yaml")))]
                unfinished = [run for run in unfinished if run not in inside]
                if unfinished:      # started runs without a summary: still running, stopped, diverged or preempted
                    print(f"note: left out {len(unfinished)} run(s) without summary.json (running, stopped or "
                          f"failed): {', '.join(run.rsplit('/', 1)[-1] for run in unfinished)}", file=sys.stderr)
                runs += inside
        if not runs:
            raise ReportError(f"{argument}: no summary.json in it or in its sub-directories; pass run directories "
                              "of finished runs, a directory that holds them, or a glob of them")
        found += [run for run in runs if run not in found]
    return found


def _read_csv(url: str) -> list[dict[str, str]]:
    """A CSV table of the run directory; empty when the run did not write it (older runs)."""
    import fsspec

    try:
        with fsspec.open(url, "r") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        return []


def load_run(url: str) -> Run:
    """Read one run's summary.json (required and checked) and its CSV tables (optional)."""
    import fsspec

    summary_url = join_url(url, "summary.json")
    try:
        with fsspec.open(summary_url, "r") as handle:
            summary = json.load(handle)
    except FileNotFoundError:
        raise ReportError(f"{summary_url} not found; pass a run directory of a finished run (it holds "
                          "summary.json)") from None
    except (ValueError, OSError) as error:
        raise ReportError(f"{summary_url} is not a readable run summary ({type(error).__name__}); pass the run "
                          "directory of a finished run, or train it again") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{summary_url} holds a {type(summary).__name__}, not a run summary; pass the run "
                          "directory of a finished run")
    missing = [key for key in ("test_acc", "density", "method") if key not in summary]
    if missing or not isinstance(summary.get("layers", {}), dict):
        raise ReportError(f"{summary_url} lacks the field(s) {', '.join(missing) or 'layers'}; pass the run "
                          "directory of a finished run, or train it again")
    return Run(url=url, summary=summary, metrics=_read_csv(join_url(url, "metrics.csv")),
               mask_updates=_read_csv(join_url(url, "mask_updates.csv")))


def _name_runs(runs: list[Run]) -> None:
    """Short unique names: the directory's own name, with its parent's when two runs share it."""
    base = [run.url.rstrip("/").rsplit("/", 1)[-1] for run in runs]
    for run, name in zip(runs, base):
        if base.count(name) > 1:
            parent = run.url.rstrip("/").rsplit("/", 2)
            name = f"{parent[-2]}-{name}" if len(parent) >= 2 else name
        run.name = name
    seen: dict[str, int] = {}
    for run in runs:        # still equal (same parent names): number them
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"


def default_out(runs: Sequence[Run]) -> str:
    """``report`` (or ``report-2``, ...) inside the single run, or in the runs' deepest common parent."""
    from fsspec.core import url_to_fs

    if len(runs) == 1:
        base = runs[0].url
    else:
        parents = [run.url.rstrip("/").rsplit("/", 1)[0] for run in runs]
        parts = [p.split("/") for p in parents]
        common = []
        for pieces in zip(*parts):
            if len(set(pieces)) > 1:
                break
            common.append(pieces[0])
        base = "/".join(common) or "."
    fs, path = url_to_fs(base)
    candidate, n = "report", 1
    while fs.exists(join_url(path, candidate)):
        n += 1
        candidate = f"report-{n}"
    return join_url(base, candidate)


# ------------------------------------------------------------------------------------------------ table


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "n/a"
    if column in ("best_acc", "final_acc", "top5"):
        return f"{100 * float(value):.2f}%"
    if column in ("inference_flops", "training_flops"):
        return f"{float(value):.3f}x"
    if column == "density":
        return f"{float(value):.4f}"
    if column == "wall_time_s":
        return f"{float(value):.1f}"
    return str(value)


def format_table(runs: Sequence[Run]) -> str:
    """The table printed on the console (the CSV holds the same rows at full precision)."""
    columns = [c for c in TABLE_COLUMNS if c != "run_dir"]
    if all(run.summary.get("test_top5") is None for run in runs):
        columns.remove("top5")
    rows = [[_cell(run.row()[c], c) for c in columns] for run in runs]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def table_csv(runs: Sequence[Run]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerow({k: "" if v is None else v for k, v in run.row().items()})
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ plots


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, url: str) -> str:
    """Write a figure as PNG to a path or URL and close it."""
    import fsspec

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    with fsspec.open(url, "wb") as handle:
        handle.write(buffer.getvalue())
    return url


def _floats(rows: Sequence[Mapping[str, str]], column: str) -> list[float | None]:
    out: list[float | None] = []
    for row in rows:
        try:
            out.append(float(row[column]) if row.get(column) not in (None, "") else None)
        except ValueError:
            out.append(None)
    return out


def plot_accuracy_vs_density(runs: Sequence[Run], url: str) -> str:
    """Final (filled) and best (hollow) accuracy against density (log axis), one line per method."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    runs = [run for run in runs if _number(run.summary.get("density")) and _number(run.summary.get("test_acc"))]
    methods = sorted({str(run.summary["method"]) for run in runs})
    for index, method in enumerate(methods):
        group = sorted((run for run in runs if str(run.summary["method"]) == method),
                       key=lambda r: float(r.summary["density"]))
        density = [float(r.summary["density"]) for r in group]
        color = f"C{index % 10}"
        axes.plot(density, [100 * float(r.summary["test_acc"]) for r in group], "o-", color=color, label=method)
        best = [(d, r.summary.get("best_test_acc")) for d, r in zip(density, group)
                if _number(r.summary.get("best_test_acc"))]
        axes.plot([d for d, _ in best], [100 * float(b) for _, b in best], "o", markerfacecolor="none", color=color)
    axes.set_xscale("log")
    axes.set_xlabel("density (fraction of prunable weights kept)")
    axes.set_ylabel("test accuracy (%)  filled: final, hollow: best")
    data = sorted({f"{r.summary.get('model')} on {r.summary.get('data')}" for r in runs})
    axes.set_title(f"accuracy against density: {', '.join(data)}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="method")
    return _save(figure, url)


def plot_layers(run: Run, url: str) -> str:
    """Each layer's density (bars) against its target (markers), and the ever-active fraction where recorded."""
    plt = _pyplot()
    layers = run.summary.get("layers") or {}
    names = list(layers)
    figure, axes = plt.subplots(figsize=(max(6.4, 0.35 * len(names) + 2), 4.2))
    positions = range(len(names))
    density = [v["kept"] / v["numel"] if v.get("numel") else 1.0 for v in layers.values()]
    axes.bar(positions, density, color="C0", label="density")
    targets = [(i, v["target"]) for i, v in enumerate(layers.values()) if v.get("target") is not None]
    if targets:
        axes.plot([i for i, _ in targets], [t for _, t in targets], "_", color="C3", markersize=14,
                  markeredgewidth=2.5, label="target")
    ever = [(i, v["ever_active"]) for i, v in enumerate(layers.values()) if v.get("ever_active") is not None]
    if ever:
        axes.plot([i for i, _ in ever], [e for _, e in ever], "^", color="C2", label="ever active")
    axes.set_xticks(list(positions), names, rotation=75, ha="right", fontsize=7)
    axes.set_ylabel("fraction of the layer's weights")
    axes.set_ylim(0, 1.05)
    axes.set_title(f"{run.name}: per-layer density ({run.summary.get('method')}, "
                   f"global {float(run.summary['density']):.4f})")
    axes.legend()
    return _save(figure, url)


def plot_density_over_steps(run: Run, url: str) -> str:
    """Global density after each mask change (steps), as a step function."""
    plt = _pyplot()
    steps = _floats(run.mask_updates, "step")
    density = _floats(run.mask_updates, "density")
    points = [(s, d) for s, d in zip(steps, density) if s is not None and d is not None]
    end = run.summary.get("steps")
    if end is not None and points and end > points[-1][0]:
        points.append((float(end), points[-1][1]))
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    axes.step([s for s, _ in points], [d for _, d in points], where="post")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("global density")
    axes.set_title(f"{run.name}: density over training ({run.summary.get('method')})")
    axes.grid(True, alpha=0.3)
    return _save(figure, url)


def plot_regrown(run: Run, url: str) -> str:
    """The fraction of active weights regrown at each mask update of a dynamic method."""
    plt = _pyplot()
    points = [(s, r) for s, r in zip(_floats(run.mask_updates, "step"), _floats(run.mask_updates, "regrown"))
              if s is not None and r is not None]
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    axes.plot([s for s, _ in points], [r for _, r in points], ".-")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("fraction of active weights regrown")
    axes.set_ylim(bottom=0)
    axes.set_title(f"{run.name}: regrowth per mask update ({run.summary.get('method')})")
    axes.grid(True, alpha=0.3)
    return _save(figure, url)


def _number(value: Any) -> bool:
    """A finite number (a summary may hold null where a value was not finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


def _changes_density(run: Run) -> bool:
    values = {round(d, 9) for d in _floats(run.mask_updates, "density") if d is not None}
    return len(values) > 1


def _regrows(run: Run) -> bool:
    return any(r for r in _floats(run.mask_updates, "regrown") if r)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_report(runs: Sequence[Run], out: str) -> list[str]:
    """Write runs.csv and every plot that applies into ``out`` (created); returns what was written."""
    import fsspec
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    written = [join_url(out, "runs.csv")]
    with fsspec.open(written[0], "w") as handle:
        handle.write(table_csv(runs))
    if len(runs) > 1:
        written.append(plot_accuracy_vs_density(runs, join_url(out, "accuracy_vs_density.png")))
    for run in runs:
        if run.summary.get("layers"):
            written.append(plot_layers(run, join_url(out, f"layers_{_safe(run.name)}.png")))
        if _changes_density(run):
            written.append(plot_density_over_steps(run, join_url(out, f"density_{_safe(run.name)}.png")))
        if _regrows(run):
            written.append(plot_regrown(run, join_url(out, f"regrown_{_safe(run.name)}.png")))
    return written


# ------------------------------------------------------------------------------------------------ prune


def plot_layer_collapse(report: Mapping[str, Any], url: str) -> str:
    """``launcher prune``'s results: per method, each layer's density against compression (log10 of 1/density),
    collapsed layers (nothing kept) drawn at the bottom edge, and the critical compression marked."""
    plt = _pyplot()
    methods = report["methods"]
    figure, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False, sharey=True)
    floor = None
    for result in methods.values():
        for run in result["runs"]:
            positive = [v["density"] for v in run["layers"].values() if v["density"] > 0]
            if positive:
                floor = min(floor or 1.0, *positive)
    floor = (floor or 1e-6) / 10      # where collapsed layers are drawn
    for axis, (name, result) in zip(axes[0], methods.items()):
        runs = result["runs"]
        compressions = [r["compression"] for r in runs]
        for index, layer in enumerate(report["prunable"]):
            values = [r["layers"][layer]["density"] for r in runs]
            axis.plot(compressions, [v if v > 0 else floor for v in values], "-", color=f"C{index % 10}",
                      linewidth=1, alpha=0.8)
            dead = [(c, floor) for c, v in zip(compressions, values) if v == 0]
            if dead:
                axis.plot(*zip(*dead), "x", color=f"C{index % 10}")
        axis.plot(compressions, [10.0 ** -c for c in compressions], "k--", linewidth=1, label="global target")
        if result["critical_compression"] is not None:
            axis.axvline(result["critical_compression"], color="red", linestyle=":", label="critical compression")
        axis.set_yscale("log")
        axis.set_title(f"{name}")
        axis.set_xlabel("compression (log10 of 1/density)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("layer density (x: collapsed, nothing kept)")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"layer collapse: {report['model']} on {report['data']}")
    return _save(figure, url)


def png_next_to(output: str) -> str:
    """The plot's URL beside a JSON report: the same name with .png."""
    return (output[:-5] if output.endswith(".json") else output) + ".png"


# ------------------------------------------------------------------------------------------------ command


def cmd_report(args: argparse.Namespace) -> int:
    """Entry point of ``python -m launcher report``."""
    from fsspec.core import url_to_fs

    from engine.monitor import format_run_summary
    from launcher.common import fail

    try:
        runs = [load_run(url) for url in find_runs(args.runs)]
        _name_runs(runs)
        out = args.out or default_out(runs)
        if args.out:
            fs, path = url_to_fs(args.out)
            if fs.exists(path):
                raise ReportError(f"--out {args.out} already exists; the report never overwrites: name a new "
                                  "directory, or leave --out out for a fresh one next to the runs")
        if len(runs) == 1:
            run = runs[0]
            try:
                print(format_run_summary(run.summary, run.url, join_url(run.url, "tensorboard")))
            except (KeyError, TypeError, ValueError) as error:
                raise ReportError(f"{join_url(run.url, 'summary.json')} lacks or garbles the field {error}; pass the "
                                  "run directory of a finished run, or train it again") from None
            print()
    except ReportError as error:
        return fail("report", str(error))
    print(format_table(runs))
    written = write_report(runs, out)
    print(f"\nreport written to {out}: " + ", ".join(w.rsplit("/", 1)[-1] for w in written))
    return 0


def add_report_command(commands: Any) -> None:
    """Register ``report`` on the launcher's sub-command parser."""
    report = commands.add_parser("report", help=HELP)
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (hold summary.json), directories of runs, or globs of them")
    report.add_argument("--out", default=None,
                        help="new directory for runs.csv and the PNG plots (default: report, report-2, ... next "
                             "to the runs, or inside the run given alone)")
    report.set_defaults(run=cmd_report)

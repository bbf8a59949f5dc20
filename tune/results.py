"""What a finished sweep leaves: a table of trials (printed, and saved as trials.csv), the best trial's config as a
YAML that ``train`` runs, a PNG of the metric against density and against each swept key, and each trial's hparams
in its TensorBoard folder (the run directories already hold the curves).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

from engine.config import write_yaml
from tune.spec import SweepPlan


def _column(frame: Any, name: str) -> list[float]:
    if frame is None or name not in frame:
        return []
    return [float(v) for v in frame[name].tolist() if v == v]     # drop NaN (an epoch without evaluation)


def _best(values: Sequence[float], mode: str) -> float:
    if not values:
        return math.nan
    return max(values) if mode == "max" else min(values)


def trial_rows(plan: SweepPlan, grid: Any) -> list[dict[str, Any]]:
    """One row per trial: swept values, final and best val/test accuracy, density, epochs, stopped early, time."""
    rows = []
    for result in grid:
        config = result.config or {}
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        epochs_planned = int(config.get("train.epochs", plan.trial_config(config).train.epochs))
        epochs_run = int(metrics.get("training_iteration", 0) or 0)
        val, test = _column(frame, "val/acc"), _column(frame, "test/acc")
        row: dict[str, Any] = {"trial": f"trial_{metrics.get('trial_id', '?')}"}
        row.update({key: config.get(key) for key in plan.space})
        row.update({
            "val_acc": val[-1] if val else math.nan, "best_val_acc": _best(val, "max"),
            "test_acc": test[-1] if test else math.nan, "best_test_acc": _best(test, "max"),
            "metric": _column(frame, plan.sweep.metric)[-1] if _column(frame, plan.sweep.metric) else math.nan,
            "density": float(metrics.get("density", math.nan)), "epochs": epochs_run,
            "stopped_early": result.error is None and epochs_run < epochs_planned,
            "status": "error" if result.error is not None else "done",
            "time_s": float(metrics.get("time_total_s", math.nan)),
        })
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    return rows


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as an aligned text table."""
    if not rows:
        return "(no trials)"
    columns = list(rows[0])
    cells = [columns] + [[_text(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells)


def write_csv(rows: Sequence[Mapping[str, Any]], url: str) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    with fsspec.open(url, "w") as handle:
        handle.write(buffer.getvalue())


def best_row(plan: SweepPlan, rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The trial with the best final metric among those that ran to the end (any trial if none did)."""
    sign = 1.0 if plan.sweep.mode == "max" else -1.0
    scored = [r for r in rows if r["status"] == "done" and not math.isnan(r["metric"])]
    finished = [r for r in scored if not r["stopped_early"]] or scored
    return max(finished, key=lambda r: sign * r["metric"]) if finished else None


def plot(plan: SweepPlan, rows: Sequence[Mapping[str, Any]], url: str) -> None:
    """Final metric against density and against each swept key, one panel each, one dot per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["density", *plan.space]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for axis, key in zip(axes[0], keys):
        values = [r[key] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        xs = values if numeric else [labels.index(str(v)) for v in values]
        for marker, early in (("o", False), ("x", True)):
            picked = [(x, r["metric"]) for x, r in zip(xs, rows) if r["stopped_early"] == early]
            if picked:
                axis.scatter(*zip(*picked), marker=marker, label="stopped early" if early else "ran to the end")
        if not numeric:
            axis.set_xticks(range(len(labels)), labels)
        elif min(values) > 0 and max(values) >= 20 * min(values):     # densities 0.01-0.3, log-uniform keys
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(plan.sweep.metric)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep {plan.sweep.name}: {len(rows)} trials")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with fsspec.open(url, "wb") as handle:
        handle.write(buffer.getvalue())


def write_hparams(plan: SweepPlan, rows: Sequence[Mapping[str, Any]]) -> None:
    """Each trial's swept values and results into its TensorBoard folder (the hparams plugin compares them)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    for row in rows:
        folder = f"{plan.trials_dir}/{row['trial']}/tensorboard"
        if "://" in folder:
            continue         # the engine uploads remote TensorBoard folders itself; hparams are local only
        values = {k: (row[k] if isinstance(row[k], (int, float, str, bool)) else str(row[k])) for k in plan.space}
        results = {f"hparam/{k}": float(row[k]) for k in ("val_acc", "test_acc", "density")
                   if not math.isnan(row[k])}
        with SummaryWriter(log_dir=folder) as writer:
            experiment, session, end = hparams(values, results)
            for summary in (experiment, session, end):
                writer.file_writer.add_summary(summary)
            for key, value in results.items():
                writer.add_scalar(key, value)


def save_results(plan: SweepPlan, grid: Any) -> dict[str, Any]:
    """Print the table and write trials.csv, best_config.yaml, sweep.png (and hparams); returns what was written."""
    rows = trial_rows(plan, grid)
    out = plan.experiment_dir
    write_csv(rows, f"{out}/trials.csv")
    print(format_table(rows))
    written: dict[str, Any] = {"rows": rows, "csv": f"{out}/trials.csv"}
    best = best_row(plan, rows)
    if best is not None:
        written["best"] = best
        written["best_config"] = f"{out}/best_config.yaml"
        write_yaml(plan.best_config({k: best[k] for k in plan.space}), written["best_config"])
        print(f"best trial {best['trial']} ({plan.sweep.metric} {best['metric']:.4f}); its config: "
              f"{written['best_config']}")
    if rows:
        written["plot"] = f"{out}/sweep.png"
        plot(plan, rows, written["plot"])
        write_hparams(plan, rows)
    print(f"trials table: {written['csv']}   TensorBoard: tensorboard --logdir {plan.trials_dir}")
    return written

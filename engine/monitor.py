"""TensorBoard scalars, a console progress bar and the end-of-run summary, all silent on non-zero ranks.

Every rank builds a Monitor so the trainer never branches on rank; ranks other than 0 pass `enabled=False` and every
call becomes a cheap no-op that touches neither disk nor console.

TensorBoard events go to `<run_dir>/tensorboard`, written through TensorBoard's own file layer: plain paths locally,
any other URL directly where it points (through fsspec; s3:// through boto3 when that is installed; each flush
appends, so the store's fsspec file system must open files in append mode, as local, memory and s3fs do),
flushed every FLUSH_SECS and at epoch ends, so a crash loses at most the unflushed tail and nothing is left in a
temporary folder. Besides scalars the Monitor writes the hparams plugin's session records (one run = one row of its
table) and a custom-scalars layout (each layer's density beside its target on one chart).

Small CSV tables (the per-epoch `metrics.csv`, the per-update `mask_updates.csv`) live in the run directory; each
write rewrites the whole file through a temporary name (object stores have no append), keeping the rows an earlier
process wrote up to the point this one resumed from, so a resumed run never holds a row twice.
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TextIO

import fsspec
from fsspec.core import url_to_fs
from tqdm import tqdm

from common.urls import join_url

__all__ = ["Bar", "Monitor", "MonitorConfig", "format_summary"]

TENSORBOARD_SUBDIR = "tensorboard"
FLUSH_SECS = 10  # how stale a live `tensorboard` view may get
_MAX_LAYER_ROWS = 40
_ELIDED_KEEP = 16  # rows kept at each end of an elided layer table


@dataclass
class MonitorConfig:
    """What rank 0 shows while training: TensorBoard events, a tqdm bar, and how often to log step scalars."""

    tensorboard: bool = True
    progress: bool = True
    log_every_steps: int = 10
    # count dead ReLU neurons (and active weights) of the layers that feed a ReLU on each evaluation, over this split
    dead_neurons: Literal["off", "train", "val", "test"] = "off"

    def __post_init__(self) -> None:
        """Reject bad values before any worker starts, field name first."""
        for name in ("tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        steps = self.log_every_steps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"log_every_steps must be an integer >= 1, got {steps!r}")
        if steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {steps}")


class Bar(Protocol):
    """The two progress-bar calls the trainer makes; both the tqdm bar and the no-op bar provide them."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, values: Mapping[str, Any]) -> None: ...


class _NullBar:
    """Progress bar for disabled monitors: accepts every call, does nothing."""

    def update(self, n: int = 1) -> None:
        """No-op."""

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        """No-op."""


class _TqdmBar:
    """Thin tqdm wrapper so the trainer depends on the Bar protocol, not on tqdm."""

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> None:
        """Advance by n steps."""
        self._bar.update(n)

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        """Show e.g. loss and lr; redrawn on the next update, so calling it every step costs little."""
        self._bar.set_postfix(dict(values), refresh=False)


class _LineBar:
    """Progress for a log file or a cluster job's output: counts steps quietly, then writes one line when closed.

    tqdm's carriage-return frames pile up in a file as one unreadable line per redraw; this keeps one line per epoch,
    plus a line every ``heartbeat_s`` seconds inside a long epoch (an ImageNet epoch runs for an hour: a job's log
    should show it is alive and how fast it goes).
    """

    heartbeat_s = 300.0

    def __init__(self, total: int, desc: str, stream: TextIO) -> None:
        self._total, self._desc, self._stream = total, desc, stream
        self._steps = 0
        self._postfix: dict[str, Any] = {}
        self._started = self._last_line = time.perf_counter()

    def update(self, n: int = 1) -> None:
        """Advance by n steps; inside a long epoch, a line every ``heartbeat_s`` seconds."""
        self._steps += n
        now = time.perf_counter()
        if now - self._last_line >= self.heartbeat_s and self._steps < self._total:
            self._last_line = now
            elapsed = now - self._started
            print(f"{self._desc}: {self._steps}/{self._total} steps after {elapsed:.0f} s "
                  f"({self._steps / elapsed:.2f} steps/s)", file=self._stream, flush=True)

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        """Remember the latest values (e.g. loss, lr) for the closing line."""
        self._postfix = dict(values)

    def close(self) -> None:
        """Write `<desc>: <steps>/<total> steps in <s> s (<rate> steps/s)[, key value ...]`."""
        elapsed = time.perf_counter() - self._started
        rate = f" ({self._steps / elapsed:.2f} steps/s)" if elapsed > 0 and self._steps else ""
        extra = "".join(f", {key} {_plain(value)}" for key, value in self._postfix.items())
        print(f"{self._desc}: {self._steps}/{self._total} steps in {elapsed:.1f} s{rate}{extra}",
              file=self._stream, flush=True)


def _is_terminal(stream: Any) -> bool:
    """True when `stream` is an interactive terminal; a closed or isatty-less stream counts as a log."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed file
        return False


def _is_local(url: str) -> bool:
    """True for plain paths and file:// URLs (written as plain paths, what `tensorboard --logdir` expects)."""
    return fsspec.utils.get_protocol(url) in ("file", "local")



class Monitor:
    """Rank-0 logging: TensorBoard scalars, a progress bar and console lines; a no-op everywhere else."""

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool = True, progress: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._show_progress = enabled and progress
        self._writer: Any = None
        self._tb_dir: str | None = None
        self._tables: dict[str, _Table] = {}
        self._hparams: dict[str, bool | int | float | str] = {}
        if enabled and tensorboard:
            self._open_writer()

    def _open_writer(self) -> None:
        """Create the SummaryWriter at `<run_dir>/tensorboard` (a plain path locally, the URL itself elsewhere)."""
        from torch.utils.tensorboard import SummaryWriter  # imported here so disabled ranks never load tensorboard

        if _is_local(self.run_dir):
            self._tb_dir = os.path.join(url_to_fs(self.run_dir)[1], TENSORBOARD_SUBDIR)
        else:
            self._tb_dir = join_url(self.run_dir, TENSORBOARD_SUBDIR)
        self._writer = SummaryWriter(log_dir=self._tb_dir, flush_secs=FLUSH_SECS)

    @property
    def tensorboard_dir(self) -> str | None:
        """Where the event files are (what `tensorboard --logdir` needs; a URL for remote run dirs), None when off."""
        return self._tb_dir

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log one value per tag at `step`; tags are slash-grouped, e.g. "train/loss", "sparsity/density/<param>"."""
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=int(step))

    def custom_scalars(self, layout: Mapping[str, Mapping[str, tuple[str, Sequence[str]]]]) -> None:
        """Charts of several tags each: category -> chart title -> ("Multiline" or "Margin", [tag regexes])."""
        if self._writer is not None:
            self._writer.add_custom_scalars({c: {t: [kind, list(tags)] for t, (kind, tags) in charts.items()}
                                             for c, charts in layout.items()})

    def hparams_start(self, hparams: Mapping[str, Any]) -> None:
        """Open this run's row of the hparams table (written at the start, so a run that crashes still shows)."""
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self._hparams = _hparam_values(hparams)
        _, start, _ = hparams_summaries(self._hparams, {})
        self._writer._get_file_writer().add_summary(start)

    def hparams_end(self, metrics: Mapping[str, float], step: int) -> None:
        """Close the row: the final metrics as `hparams/<name>` scalars (the table's metric columns) and the
        session's end (status success)."""
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.scalars({f"hparams/{name}": value for name, value in metrics.items()}, step)
        _, _, end = hparams_summaries(self._hparams or {"run": "sparsetrain"}, {})   # status: success
        self._writer._get_file_writer().add_summary(end)

    def table_rows(self, name: str, rows: Sequence[Mapping[str, Any]], *, columns: Sequence[str], key: str,
                   since: float) -> None:
        """Add ``rows`` to the CSV ``<run_dir>/<name>`` and rewrite it (nothing happens for no rows). Rows already in
        the file are kept while their ``key`` column is <= ``since`` (the epoch or step this process resumed from)
        and dropped after it; the rows this process added follow. Values missing from a row are left empty."""
        if not self.enabled or not rows:
            return
        table = self._tables.get(name)
        if table is None:
            table = self._tables[name] = _Table(join_url(self.run_dir, name), list(columns))
            table.read_before(key, since)
        table.rows.extend(dict(row) for row in rows)
        table.write()

    def flush(self) -> None:
        """Push pending events to disk now, e.g. at the end of an epoch (the writer also flushes every FLUSH_SECS)."""
        if self._writer is not None:
            self._writer.flush()

    @contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Bar]:
        """A progress bar over `total` steps that disappears when done; a no-op bar when disabled.

        The bar goes to stderr. When stderr is not a terminal (a log file, a batch job) there are no redraws: one
        line per call says how many steps ran and how long they took, written when the block ends.
        """
        if not self._show_progress:
            yield _NullBar()
            return
        if not _is_terminal(sys.stderr):
            line = _LineBar(total, desc, sys.stderr)
            try:
                yield line
            finally:
                line.close()
            return
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.1)
        try:
            yield _TqdmBar(bar)
        finally:
            bar.close()

    def print(self, text: str) -> None:
        """Print on rank 0 without tearing an active progress bar."""
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        """Flush and close the writer; safe to call twice."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _hparam_values(hparams: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """Values the hparams plugin accepts: numbers, strings and booleans as they are, anything else as text."""
    return {key: value if isinstance(value, (bool, int, float, str)) else ("none" if value is None else str(value))
            for key, value in hparams.items()}


class _Table:
    """One CSV file of the run directory: the rows kept from an earlier process, then this process's rows."""

    def __init__(self, url: str, columns: list[str]) -> None:
        self.url = url
        self.columns = columns
        self.kept: list[dict[str, str]] = []
        self.rows: list[dict[str, Any]] = []

    def read_before(self, key: str, since: float) -> None:
        """Keep the existing rows whose ``key`` is <= ``since`` (a row without a number there is dropped)."""
        fs, path = url_to_fs(self.url)
        if not fs.exists(path):
            return
        with fs.open(path, "r") as handle:
            for row in csv.DictReader(handle):
                try:
                    if float(row.get(key) or "nan") <= since:
                        self.kept.append(row)
                except ValueError:
                    continue

    def write(self) -> None:
        """Write every row to a temporary name, then move it over the file: a reader never sees half a table."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in [*self.kept, *self.rows]:
            writer.writerow({c: _cell(row.get(c)) for c in self.columns})
        fs, path = url_to_fs(self.url)
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path + ".tmp", "w") as handle:
            handle.write(buffer.getvalue())
        fs.mv(path + ".tmp", path)


def _cell(value: Any) -> str:
    """A CSV cell: empty for missing values, floats at full precision."""
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------------------
# End-of-run summary
# ----------------------------------------------------------------------------------------------------------------


def _percent(value: Any) -> str:
    """Accuracy fraction as a percentage; 'n/a' when the run did not produce it."""
    return "n/a" if value is None else f"{100.0 * float(value):.2f}%"


def _plain(value: Any) -> str:
    """Other summary values: floats to 6 significant digits so seconds and losses stay readable."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _layer_rows(layers: list[tuple[str, int, int]]) -> list[str]:
    """Table of prunable layers with a total row; long lists keep both ends and say how many rows were cut."""
    shown: list[tuple[str, int, int] | int] = list(layers)
    if len(layers) > _MAX_LAYER_ROWS:
        shown = [*layers[:_ELIDED_KEEP], len(layers) - 2 * _ELIDED_KEEP, *layers[-_ELIDED_KEEP:]]
    width = max([len("layer"), len("total")] + [len(row[0]) for row in shown if isinstance(row, tuple)])

    def row(name: str, params: int, nonzero: int) -> str:
        density = f"{nonzero / params:.4f}" if params else "n/a"
        return f"  {name:<{width}}  {params:>13,}  {nonzero:>13,}  {density:>8}"

    lines = [f"  {'layer':<{width}}  {'params':>13}  {'nonzero':>13}  {'density':>8}"]
    for item in shown:
        lines.append(f"  {'...':<{width}}  ({item} more layers elided)" if isinstance(item, int) else row(*item))
    lines.append(row("total", sum(p for _, p, _ in layers), sum(n for _, _, n in layers)))
    return lines


def format_summary(summary: Mapping[str, Any], layers: list[tuple[str, int, int]], run_dir: str,
                   tb_dir: str | None, *, checkpoint_dir: str | None = None,
                   config_path: str | None = None) -> str:
    """The table printed at the end of a run: results, per-layer sparsity, and where to find everything.

    `summary` keys: "test_acc" and "best_acc" (fractions in [0, 1]), optional "best_epoch", and optional
    "density" (global density of prunable weights; computed from `layers` when absent). Any other keys are listed
    as they are. `layers` holds (parameter name, number of weights, number of nonzero weights).
    """
    params = sum(p for _, p, _ in layers)
    nonzero = sum(n for _, _, n in layers)
    density = summary.get("density", nonzero / params if params else None)
    best = _percent(summary.get("best_acc"))
    if summary.get("best_epoch") is not None:
        best += f" (epoch {summary['best_epoch']})"
    lines = ["sparsetrain run summary", f"  test accuracy   {_percent(summary.get('test_acc'))}",
             f"  best accuracy   {best}"]
    density_text = "n/a" if density is None else f"{float(density):.4f}"
    if params:
        density_text += f" ({nonzero:,} of {params:,} prunable weights nonzero)"
    lines.append(f"  global density  {density_text}")
    known = {"test_acc", "best_acc", "best_epoch", "density"}
    lines += [f"  {key:<15} {_plain(value)}" for key, value in summary.items() if key not in known]
    lines += ["", *(_layer_rows(layers) if layers else ["  no prunable layers"]), ""]
    lines += [f"  run directory   {run_dir}",
              f"  checkpoints     {checkpoint_dir or join_url(run_dir, 'checkpoints')}",
              f"  config          {config_path or join_url(run_dir, 'config.yaml')}",
              f"  tensorboard     {'tensorboard --logdir ' + shlex.quote(tb_dir) if tb_dir else 'off'}"]
    return "\n".join(lines)


def format_run_summary(summary: Mapping[str, Any], run_dir: str, tb_dir: str | None) -> str:
    """The end-of-run table straight from a summary.json mapping (used by the trainer and `launcher report`)."""
    hidden = {"layers", "run_dir", "best_test_acc", "test_loss", "neurons", "method_metrics", "flops"}
    shown = {key: value for key, value in summary.items() if key not in hidden}
    shown["best_acc"] = summary.get("best_test_acc")
    for key in ("test_top5", "val_top5"):
        if key in shown:
            shown[key] = _percent(shown[key])
    flops = summary.get("flops")
    if flops:       # one line: the relative FLOPs papers quote beside accuracy
        shown["flops"] = (f"inference {100 * flops['inference_relative']:.1f}% of dense "
                          f"({flops['inference_flops']:.3g} per sample), training "
                          f"{100 * flops['training_relative']:.1f}% of dense")
    history = (summary.get("neurons") or {}).get("history") or []
    if history:     # the dead-neuron monitor's last census, one line (the per-epoch history stays in the file)
        last = history[-1]
        shown["dead_neurons"] = (f"{last['dead_total']:,} of {last['neurons_total']:,} "
                                 f"({summary['neurons']['split']} split, epoch {last['epoch']}); active weights "
                                 f"{last['active_params']:,} of {last['params']:,}")
    layers = [(name, int(v["numel"]), int(v["nonzero"])) for name, v in summary.get("layers", {}).items()]
    return format_summary(shown, layers, run_dir, tb_dir)

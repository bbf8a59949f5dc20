"""TensorBoard scalars, a console progress bar and the end-of-run summary, all silent on non-zero ranks.

Every rank builds a Monitor so the trainer never branches on rank; ranks other than 0 pass `enabled=False` and every
call becomes a cheap no-op that touches neither disk nor console.

TensorBoard events go to `<run_dir>/tensorboard`. The SummaryWriter writes local files only, so when `run_dir` is a
non-local fsspec URL (s3://, gs://, memory://...) events are written to a local temporary directory instead, the
Monitor prints where, and `close()` copies them to `<run_dir>/tensorboard`. A run that crashes before `close()` keeps
its events only in that local directory.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import fsspec
from fsspec.core import url_to_fs
from tqdm import tqdm

__all__ = ["Bar", "Monitor", "MonitorConfig", "format_summary"]

TENSORBOARD_SUBDIR = "tensorboard"
FLUSH_SECS = 10  # how stale a live `tensorboard` view may get
_NON_TTY_MININTERVAL = 30.0  # seconds between bar redraws when stderr is a log file, not a terminal
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


def _is_local(url: str) -> bool:
    """True for plain paths and file:// URLs, the only places SummaryWriter can write."""
    return fsspec.utils.get_protocol(url) in ("file", "local")


def _join(directory: str, name: str) -> str:
    """Join with '/' keeping the caller's spelling of the directory."""
    return f"{directory.rstrip('/')}/{name}"


class Monitor:
    """Rank-0 logging: TensorBoard scalars, a progress bar and console lines; a no-op everywhere else."""

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool = True, progress: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._show_progress = enabled and progress
        self._writer: Any = None
        self._tb_dir: str | None = None
        self._upload_to: str | None = None
        if enabled and tensorboard:
            self._open_writer()

    def _open_writer(self) -> None:
        """Create the SummaryWriter locally; for remote run dirs pick a temp dir and remember where to upload."""
        from torch.utils.tensorboard import SummaryWriter  # imported here so disabled ranks never load tensorboard

        if _is_local(self.run_dir):
            self._tb_dir = os.path.join(url_to_fs(self.run_dir)[1], TENSORBOARD_SUBDIR)
        else:
            self._tb_dir = tempfile.mkdtemp(prefix="sparsetrain-tensorboard-")
            self._upload_to = _join(self.run_dir, TENSORBOARD_SUBDIR)
        os.makedirs(self._tb_dir, exist_ok=True)
        self._writer = SummaryWriter(log_dir=self._tb_dir, flush_secs=FLUSH_SECS)
        if self._upload_to is not None:
            self.print(f"TensorBoard: {self.run_dir} is not a local path; writing events to {self._tb_dir} "
                       f"and copying them to {self._upload_to} at the end of the run")

    @property
    def tensorboard_dir(self) -> str | None:
        """Local directory holding the event files (what `tensorboard --logdir` needs), or None when off."""
        return self._tb_dir

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log one value per tag at `step`; tags are slash-grouped, e.g. "train/loss", "sparsity/density/<param>"."""
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=int(step))

    def flush(self) -> None:
        """Push pending events to disk now, e.g. at the end of an epoch (the writer also flushes every FLUSH_SECS)."""
        if self._writer is not None:
            self._writer.flush()

    @contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Bar]:
        """A progress bar over `total` steps that disappears when done; a no-op bar when disabled."""
        if not self._show_progress:
            yield _NullBar()
            return
        interactive = sys.stderr.isatty()
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                   mininterval=0.1 if interactive else _NON_TTY_MININTERVAL)
        try:
            yield _TqdmBar(bar)
        finally:
            bar.close()

    def print(self, text: str) -> None:
        """Print on rank 0 without tearing an active progress bar."""
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        """Flush and close the writer, then copy events to a remote run dir; safe to call twice."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        if self._upload_to is not None and self._tb_dir is not None:
            _upload_tree(self._tb_dir, self._upload_to)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _upload_tree(local_dir: str, url: str) -> None:
    """Copy every file under local_dir to the same relative path under url (file by file: no cp -r nesting rules)."""
    fs, root = url_to_fs(url)
    for folder, _, files in os.walk(local_dir):
        rel = os.path.relpath(folder, local_dir)
        target = root if rel == "." else f"{root.rstrip('/')}/{rel.replace(os.sep, '/')}"
        fs.makedirs(target, exist_ok=True)
        for name in files:
            fs.put_file(os.path.join(folder, name), f"{target.rstrip('/')}/{name}")


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
              f"  checkpoints     {checkpoint_dir or _join(run_dir, 'checkpoints')}",
              f"  config          {config_path or _join(run_dir, 'config.yaml')}",
              f"  tensorboard     {'tensorboard --logdir ' + shlex.quote(tb_dir) if tb_dir else 'off'}"]
    return "\n".join(lines)


def format_run_summary(summary: Mapping[str, Any], run_dir: str, tb_dir: str | None) -> str:
    """The end-of-run table straight from a summary.json mapping (used by the trainer and `launcher report`)."""
    hidden = {"layers", "run_dir", "best_test_acc", "test_loss", "neurons", "method_metrics"}
    shown = {key: value for key, value in summary.items() if key not in hidden}
    shown["best_acc"] = summary.get("best_test_acc")
    history = (summary.get("neurons") or {}).get("history") or []
    if history:     # the dead-neuron monitor's last census, one line (the per-epoch history stays in the file)
        last = history[-1]
        shown["dead_neurons"] = (f"{last['dead_total']:,} of {last['neurons_total']:,} "
                                 f"({summary['neurons']['split']} split, epoch {last['epoch']}); active weights "
                                 f"{last['active_params']:,} of {last['params']:,}")
    layers = [(name, int(v["numel"]), int(v["nonzero"])) for name, v in summary.get("layers", {}).items()]
    return format_summary(shown, layers, run_dir, tb_dir)

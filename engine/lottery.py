"""Iterative magnitude pruning (lottery tickets): levels of normal training runs, each resumable on its own.

``<output_dir>/<name>/level-00`` trains densely (method ``lottery_level``, level 0) and records the rewind weights;
``level-01``, ``level-02``, ... each start from the previous level's end state, pruned by ``prune_fraction`` of the
remaining weights and rewound (``pruning/methods/lottery.py``). A level with ``summary.json`` is done and is skipped;
an unfinished one continues from its latest checkpoint (``resume=auto``), so re-running the same command after a
crash picks up where it stopped. Either happens only when the level's saved config matches the command's (a
changed ``prune_fraction`` or learning rate is refused in one line, never silently mixed in). Between levels the
driver writes ``lottery_end.pt`` into the finished level's directory: its trained weights, masks and rewind weights,
the only thing the next level reads.

Levels run in this process, one after another (no torchrun), and the parent directory must be local: the next
level's method reads ``lottery_end.pt`` with ``torch.load`` (the pruning package uses torch only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import fsspec
import yaml

from engine.checkpoint import Checkpointer, load_state, save_state
from engine.config import ConfigError, to_dict
from engine.run_config import RunConfig
from engine.run_dirs import config_changes, with_defaults
from engine.trainer import train
from pruning.methods.lottery import LotteryConfig

END_STATE = "lottery_end.pt"


def level_name(level: int) -> str:
    return f"level-{level:02d}"


def lottery_parent(cfg: RunConfig) -> Path:
    """The local directory that holds every level; other fsspec protocols are refused with the reason."""
    fs, path = fsspec.core.url_to_fs(cfg.output_dir)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise ConfigError(f"output_dir {cfg.output_dir} is not local; the lottery driver passes each level's end "
                          "state to the next as a local file, so use a local output_dir")
    return Path(path) / cfg.name


def check_lottery(cfg: RunConfig) -> LotteryConfig:
    """The lottery section of a config, or a one-line ConfigError saying what to set."""
    if not isinstance(cfg.sparsity, LotteryConfig):
        raise ConfigError(f"sparsity.method must be lottery_level for the lottery command, got "
                          f"'{cfg.sparsity.method}'")
    if cfg.sparsity.level != 0 or cfg.sparsity.previous is not None:
        raise ConfigError("sparsity.level and sparsity.previous are set by the lottery driver; leave them out")
    if cfg.resume is not None:
        raise ConfigError("resume is managed per level by the lottery driver (finished levels are skipped, the "
                          "current one resumes); leave it out")
    return cfg.sparsity


def level_config(cfg: RunConfig, level: int, previous: str | None) -> RunConfig:
    """Level ``level``'s run: its own directory under the parent, resumable, with a final checkpoint."""
    parent = lottery_parent(cfg)
    sparsity = dataclasses.replace(cfg.sparsity, level=level, previous=previous)
    checkpoint = dataclasses.replace(cfg.checkpoint, dir=None, save_final=True)
    return dataclasses.replace(cfg, name=level_name(level), output_dir=str(parent), resume="auto",
                               sparsity=sparsity, checkpoint=checkpoint)


def export_end_state(run_dir: Path) -> str:
    """Write the finished level's trained weights, masks and rewind weights for the next level; returns the path."""
    target = run_dir / END_STATE
    if not target.exists():
        latest = Checkpointer(str(run_dir / "checkpoints")).latest()
        if latest is None:
            raise FileNotFoundError(f"{run_dir} finished without a checkpoint; the next level has nothing to prune")
        state = load_state(latest)
        save_state(str(target), {"weights": state["model"], "masks": state["masks"],
                                 "rewind": state["method"].get("rewind")})
    return str(target)


def check_levels(cfg: RunConfig) -> None:
    """Refuse, before any training, levels already on disk that were run under other settings: a finished level is
    reused and an unfinished one resumed only when its config.yaml matches this command's config of that level
    (exactly, ``train.epochs`` included, but for where files go and what is logged)."""
    lottery = check_lottery(cfg)
    parent = lottery_parent(cfg)
    for level in range(lottery.levels + 1):
        saved = parent / level_name(level) / "config.yaml"
        if not saved.exists():
            continue
        previous = str(parent / level_name(level - 1) / END_STATE) if level else None
        wanted = to_dict(level_config(cfg, level, previous))
        changes = config_changes(with_defaults(yaml.safe_load(saved.read_text()) or {}), wanted, grow_epochs=False)
        if changes:
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            raise ConfigError(f"lottery {parent} has {level_name(level)} from other settings ({shown}); rerun with "
                              "those values, or start a new lottery with another name")


def run_lottery(cfg: RunConfig) -> list[dict[str, Any]]:
    """Train every level (skipping finished ones); returns one summary row per level, also in lottery.json."""
    lottery = check_lottery(cfg)
    check_levels(cfg)
    parent = lottery_parent(cfg)
    rows: list[dict[str, Any]] = []
    previous: str | None = None
    for level in range(lottery.levels + 1):
        run_dir = parent / level_name(level)
        done = run_dir / "summary.json"
        summary = json.loads(done.read_text()) if done.exists() else train(level_config(cfg, level, previous))
        rows.append({"level": level, "density": summary["density"], "test_acc": summary["test_acc"],
                     "best_test_acc": summary["best_test_acc"], "run_dir": str(run_dir)})
        if level < lottery.levels:
            previous = export_end_state(run_dir)
    (parent / "lottery.json").write_text(json.dumps(rows, indent=2))
    return rows


def format_lottery(rows: list[dict[str, Any]]) -> str:
    """A small table: level, density, final and best test accuracy."""
    lines = ["level  density   test acc  best acc"]
    lines += [f"{r['level']:>5}  {r['density']:.5f}  {100 * r['test_acc']:7.2f}%  {100 * r['best_test_acc']:7.2f}%"
              for r in rows]
    return "\n".join(lines)

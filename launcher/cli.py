"""The commands people run: ``train`` and ``report`` here, ``prune`` and ``lottery`` in their own modules.

``python -m launcher train CONFIG [key=value ...]`` checks the whole config and the data before any worker starts,
then trains in this process, or, with ``--nproc-per-node N``, starts N workers through torchrun. The same command
also runs as a worker under a user's own ``torchrun ... -m launcher train ...`` (multi-node included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

import fsspec

from engine.config import ConfigError, to_dict
from launcher.common import check, fail, is_worker
from launcher.evaluate import add_evaluate_command
from launcher.export import add_export_command
from launcher.lottery import add_lottery_command
from launcher.prune import add_prune_command
from launcher.tune import add_tune_command


def _spawn(args: argparse.Namespace) -> int:
    """Start ``--nproc-per-node`` workers on this machine with torchrun (a free port, no fixed one)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc_per_node}", "-m", "launcher", "train"]
    command += ([args.config] if args.config else []) + list(args.overrides)
    return subprocess.call(command)


def cmd_train(args: argparse.Namespace) -> int:
    """Entry point of ``python -m launcher train``: check everything, then train here or start workers."""
    try:
        cfg = check(args.config, args.overrides)
    except ConfigError as error:
        return fail("config", str(error))
    except FileNotFoundError as error:
        return fail("data", str(error))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.nproc_per_node > 1 and not is_worker():
        return _spawn(args)
    from engine.trainer import train

    train(cfg)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the summary table of a finished run."""
    from engine.monitor import format_run_summary

    url = f"{args.run_dir.rstrip('/')}/summary.json"
    try:
        with fsspec.open(url, "r") as handle:
            summary = json.load(handle)
    except FileNotFoundError:
        return fail("report", f"{url} not found; pass a run directory of a finished run (it holds summary.json)")
    print(format_run_summary(summary, args.run_dir, f"{args.run_dir.rstrip('/')}/tensorboard"))
    return 0


def parser() -> argparse.ArgumentParser:
    """The launcher's argument parser, one sub-command per command."""
    root = argparse.ArgumentParser(prog="python -m launcher", description="sparsetrain: train sparse networks")
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model under a sparsity method")
    train.add_argument("config", nargs="?", help="YAML config file (e.g. configs/quickstart.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 sparsity.density=0.1")
    train.add_argument("--nproc-per-node", type=int, default=1, help="start N DDP workers here via torchrun")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(run=cmd_train)
    report = commands.add_parser("report", help="print the summary of a finished run")
    report.add_argument("run_dir", help="the run directory (holds summary.json)")
    report.set_defaults(run=cmd_report)
    add_prune_command(commands)
    add_lottery_command(commands)
    add_evaluate_command(commands)
    add_export_command(commands)
    add_tune_command(commands)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit status."""
    root = parser()
    args, extra = root.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops collecting positionals at the first option)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        root.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "config", None) and "=" in args.config:   # overrides only, no file
        args.overrides = [args.config, *args.overrides]
        args.config = None
    return args.run(args)

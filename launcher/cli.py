"""The commands people run: ``train`` here; ``report``, ``prune``, ``lottery``... in their own modules.

``python -m launcher train CONFIG [key=value ...]`` checks the whole config and the data before any worker starts,
then trains in this process, or, with ``--nproc-per-node N``, starts N workers through torchrun. The same command
also runs as a worker under a user's own ``torchrun ... -m launcher train ...`` (multi-node included).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

from engine.config import ConfigError, to_dict

# Sub-commands whose modules import torch: (name, help, module, function that registers the full parser). The root
# parser lists them by name and help alone, so ``python -m launcher --help`` imports no torch and answers at once;
# only the chosen command's module is imported (tests/test_cli_fast.py keeps these help lines equal to the modules').
LAZY_COMMANDS: tuple[tuple[str, str, str, str], ...] = (
    ("prune", "prune at initialisation over methods and compressions (no training)", "launcher.prune",
     "add_prune_command"),
    ("lottery", "iterative magnitude pruning: train, prune, rewind, repeat", "launcher.lottery", "add_lottery_command"),
    ("evaluate", "clean and corrupted (CIFAR-10-C layout) test accuracy of a run", "launcher.evaluate",
     "add_evaluate_command"),
    ("export", "write a trained sparse model as dense/compact/csr/hashed/2:4 safetensors", "launcher.export",
     "add_export_command"),
    ("tune", "run a Ray Tune sweep of training runs (local Ray or a cluster)", "launcher.tune", "add_tune_command"),
    ("report", "a table and plots across finished runs (CSV and PNG)", "launcher.report", "add_report_command"),
)


def _spawn(args: argparse.Namespace, resume: str | None, default_run_dir: str) -> int:
    """Start ``--nproc-per-node`` workers on this machine with torchrun (a free port, no fixed one) and supervise
    them (launcher/supervise.py): signals passed on, one line on a failure, 75 passed through when preempted.
    ``resume`` is the checked config's; ``default_run_dir`` (<output_dir>/<name>) is where resume=auto looks."""
    from launcher.common import fail
    from launcher.supervise import conclude, resume_command, run_torchrun, torchrun_command

    restarts = args.max_restarts
    if restarts < 0:
        return fail("config", f"--max-restarts must be 0 or more, got {restarts}")
    if restarts and resume not in (None, "auto"):
        return fail("config", f"--max-restarts continues the run from its own latest checkpoint (resume=auto), but "
                              f"resume={resume} is set; resume once without --max-restarts, or drop resume")
    worker_args = ([args.config] if args.config else []) + list(args.overrides)
    if restarts:      # a restarted worker finds the run's latest checkpoint by itself
        worker_args.append("resume=auto")
    outcome = run_torchrun(torchrun_command(args.nproc_per_node, restarts, worker_args), args.nproc_per_node,
                           restarts)
    again = resume_command(args.config, args.overrides, args.nproc_per_node, restarts, outcome.run_dir,
                           default_run_dir)
    code, line = conclude(outcome, again)
    if line:
        print(line, file=sys.stderr, flush=True)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    """Entry point of ``python -m launcher train``: check everything, then train here or start workers."""
    from launcher.common import BadInput, check, fail, finished_run, is_worker, report_failure

    try:
        cfg = check(args.config, args.overrides, nproc=1 if is_worker() else args.nproc_per_node)
        done = None if is_worker() else finished_run(cfg)
    except ConfigError as error:
        return fail("config", str(error))
    except FileNotFoundError as error:
        return fail("data", str(error))
    except BadInput as error:
        return fail(error.kind, str(error))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if done is not None:    # rerunning a finished job (resume=auto) succeeds and leaves its record as it is
        print(f"run {done} already trained {cfg.train.epochs} epochs (summary.json); nothing to do: raise "
              "train.epochs to train on")
        return 0
    if (args.nproc_per_node > 1 or args.max_restarts) and not is_worker():
        return _spawn(args, cfg.resume, f"{cfg.output_dir.rstrip('/')}/{cfg.name}")
    from engine.trainer import train

    try:
        train(cfg)
    except Exception as error:   # one line, from the first rank that fails; the traceback goes to a log file
        return report_failure(error, cfg)
    return 0


def parser(full: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The launcher's argument parser, one sub-command per command; of the ``LAZY_COMMANDS`` only those named in
    ``full`` (all when None) get their arguments, the others their name and help."""
    installed = sys.argv[0].endswith(("sparsetrain", "sparsetrain.exe"))   # the console script of pyproject.toml
    root = argparse.ArgumentParser(prog="sparsetrain" if installed else "python -m launcher",
                                   description="sparsetrain: train sparse networks")
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model under a sparsity method")
    train.add_argument("config", nargs="?", help="YAML config file (e.g. configs/quickstart.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 sparsity.density=0.1")
    train.add_argument("--nproc-per-node", type=int, default=1, help="start N DDP workers here via torchrun")
    train.add_argument("--max-restarts", type=int, default=0, metavar="N",
                       help="restart the workers up to N times when one fails; they continue from the run's latest "
                            "checkpoint (resume=auto)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(run=cmd_train)
    for name, text, module, register in LAZY_COMMANDS:
        if full is None or name in full:
            getattr(importlib.import_module(module), register)(commands)
        else:
            commands.add_parser(name, help=text)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit status."""
    words = sys.argv[1:] if argv is None else list(argv)
    root = parser(full=[word for word in words[:1] if not word.startswith("-")])   # the command comes first
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

"""``python -m launcher tune SWEEP.yaml [key=value ...]``: a Ray Tune sweep of ``train`` runs.

The sweep file (see tune/spec.py and docs/tune.md) and its overrides (dotted keys into the sweep file, e.g.
``num_samples=8 set.train.epochs=2 resume=true``) are checked in full, against the same run-config checks as
``train``, before Ray starts: a bad file fails in one line with exit status 2. Then the sweep runs on a local Ray (or
joins ``ray.address`` / RAY_ADDRESS) and its results are printed and saved in ``<sweep_dir>/<name>``.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.config import ConfigError
from launcher.common import fail


def cmd_tune(args: argparse.Namespace) -> int:
    """Check the sweep file, then run or resume the sweep and save its results."""
    from tune.spec import load_sweep

    try:
        plan = load_sweep(args.sweep, args.overrides)
    except ConfigError as error:
        return fail("sweep", str(error))
    except FileNotFoundError as error:
        return fail("data", str(error))
    if args.check:
        print(f"sweep {plan.sweep.name}: {len(plan.space)} swept keys, {plan.sweep.num_samples} samples, "
              f"scheduler {plan.sweep.scheduler.name}, checked; would write to {plan.experiment_dir}")
        return 0
    from tune.results import save_results
    from tune.runner import run_sweep

    try:
        grid = run_sweep(plan, verbose=args.verbose)
    except ConfigError as error:
        return fail("sweep", str(error))
    written = save_results(plan, grid)
    return 0 if written["rows"] and any(r["status"] == "done" for r in written["rows"]) else 1


def add_tune_command(commands: Any) -> None:
    """Register ``tune`` on the launcher's sub-command parser."""
    tune = commands.add_parser("tune", help="run a Ray Tune sweep of training runs (local Ray or a cluster)")
    tune.add_argument("sweep", help="sweep YAML file (e.g. configs/sweeps/set_digits.yaml)")
    tune.add_argument("overrides", nargs="*", help="dotted overrides of the sweep file, e.g. num_samples=8 "
                                                   "set.train.epochs=2 resume=true")
    tune.add_argument("--check", action="store_true", help="check the sweep file and exit (Ray is not started)")
    tune.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune's console output level")
    tune.set_defaults(run=cmd_tune)

"""``python -m launcher lottery CONFIG [key=value ...]``: iterative magnitude pruning, level by level.

The config's ``sparsity`` section uses ``method: lottery_level`` (levels, prune_fraction, scope, rewind_step); every
level is a normal training run under ``<output_dir>/<name>/level-NN`` (see ``engine/lottery.py``). Re-running the same
command skips finished levels and resumes the current one; with changed settings it is refused before any training.
"""

from __future__ import annotations

import argparse
import sys

from engine.config import ConfigError
from launcher.common import BadInput, check, fail, is_worker, report_failure


def cmd_lottery(args: argparse.Namespace) -> int:
    """Entry point of ``python -m launcher lottery``: every level in this process, one after another."""
    if is_worker():
        return fail("config", "the lottery command runs its levels in one process; start it without torchrun")
    try:
        cfg = check(args.config, args.overrides)
        from engine.lottery import check_levels, format_lottery, run_lottery

        check_levels(cfg)
    except ConfigError as error:
        return fail("config", str(error))
    except FileNotFoundError as error:
        return fail("data", str(error))
    except BadInput as error:
        return fail(error.kind, str(error))
    try:
        rows = run_lottery(cfg)
    except Exception as error:   # one line; the traceback goes to a log file
        return report_failure(error, cfg)
    print(format_lottery(rows), file=sys.stdout)
    return 0


def add_lottery_command(commands: argparse._SubParsersAction) -> None:
    """Register ``lottery`` on the launcher's sub-command parser."""
    lottery = commands.add_parser("lottery", help="iterative magnitude pruning: train, prune, rewind, repeat")
    lottery.add_argument("config", nargs="?", help="YAML config whose sparsity.method is lottery_level")
    lottery.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sparsity.levels=5")
    lottery.set_defaults(run=cmd_lottery)

"""What the launcher's commands share: reading the launch environment, one-line failures, the config and data check.

Every command fails the same way on bad input (one line on stderr from rank 0, exit status 2) before any worker or
run starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from engine.data import check_data_available
from engine.run_config import RunConfig, load_config


def is_worker() -> bool:
    """True inside a torchrun / deepspeed worker (the launcher must not start workers again)."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def fail(kind: str, message: str) -> int:
    """Print ``<kind> error: <message>`` once (from rank 0) and return the exit status for bad input."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{kind} error: {message}", file=sys.stderr)
    return 2


def check(config: str | None, overrides: Sequence[str]) -> RunConfig:
    """Load and validate config and data; raises ConfigError / FileNotFoundError with one-line messages."""
    cfg = load_config(config, overrides)
    if not (cfg.data.download and is_worker()):   # workers download rank-0-first in build_loaders instead
        check_data_available(cfg.data)
    return cfg

"""Run under torchrun by tests/test_divergence.py: only rank 1's training loss turns NaN (from its 3rd micro-batch);
every rank must stop with Diverged (no rank left waiting in a collective). Each rank writes what it raised."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import engine.trainer as trainer_module
from engine.backends import DistEnv
from engine.errors import Diverged
from engine.run_config import load_config
from engine.trainer import train


def main(out_dir: str, overrides: list[str]) -> None:
    env = DistEnv.from_environ()
    real = trainer_module.build_loss
    calls = [0]

    def build(name: str, *args: Any) -> Any:
        loss = real(name, *args)
        if not args:               # the evaluation loss: untouched
            return loss

        def poisoned(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            value = loss(outputs, targets)
            return value * float("nan") if env.rank == 1 and calls[0] >= 3 else value

        return poisoned

    trainer_module.build_loss = build
    try:
        train(load_config(None, overrides))
        outcome = "finished"
    except Diverged as error:
        outcome = f"Diverged {error}"
    Path(out_dir, f"rank{env.rank}.txt").write_text(outcome)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

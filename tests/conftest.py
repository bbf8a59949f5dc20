"""Shared pytest hooks: tests marked ``gpu`` run only where CUDA is visible and are skipped, with the reason, elsewhere.

CI has no GPU, so it collects and skips them; ``benchmarks/gpu_acceptance.py`` runs them on a lent GPU machine.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run on a GPU machine: bash benchmarks/gpu_acceptance.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

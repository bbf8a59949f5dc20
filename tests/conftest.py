"""Shared pytest hooks: tests marked ``gpu`` run only where CUDA is visible and are skipped, with the reason, elsewhere.

CI has no GPU, so it collects and skips them; ``benchmarks/gpu_acceptance.py`` runs them on a lent GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-tensor tests (a second intra-op thread only spins, and costs seconds on a
    shared machine); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run on a GPU machine: bash benchmarks/gpu_acceptance.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

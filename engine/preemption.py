"""SIGTERM as a request to stop at the next step boundary, with a checkpoint, instead of dying mid-step.

Clusters preempt a job by sending SIGTERM and, after a grace period, SIGKILL. ``PreemptionSignal`` turns SIGTERM into
a flag that the training loop reads after every optimizer step; the ranks agree on it there (one rank may be the only
one signalled), write a checkpoint together and stop with ``engine.errors.Preempted`` (exit 75).

The handler exists only inside ``installed()``, and the handler that was there before comes back on leaving it, so a
process that embeds training (a Ray Tune worker, a notebook) keeps its own SIGTERM behaviour between runs. Python
only lets the main thread install handlers; elsewhere nothing is installed and SIGTERM keeps its old meaning.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class PreemptionSignal:
    """A flag set by SIGTERM while ``installed()`` (or by ``request()``); the loop polls ``requested``."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def request(self, signal_number: int = signal.SIGTERM) -> None:
        """Ask the run to stop at its next step boundary (what the handler does)."""
        self.signal_number = signal_number

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        self.request(signal_number)

    @contextlib.contextmanager
    def installed(self) -> Iterator[PreemptionSignal]:
        """SIGTERM sets the flag inside the block; the previous handler is restored however the block ends."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

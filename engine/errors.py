"""How a run stops on purpose: each reason is an exception with a one-line message and the process exit status.

The trainer raises these; the launcher prints the message once (rank 0, or the first rank that saw it) and exits
with ``exit_code``, so a script or a cluster scheduler can tell the reasons apart without parsing text:

- 2: bad input, refused before any worker starts (``launcher.common.fail``; not an exception here)
- 3: the run diverged (a non-finite loss); every finite checkpoint is kept
- 75: preempted (SIGTERM): a checkpoint was saved at a step boundary; run the same command with ``resume=auto``
  (75 is EX_TEMPFAIL of sysexits.h, "temporary failure, try again")
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75


class RunStopped(Exception):
    """A run that ended on purpose before its last epoch; ``str(error)`` is the one line to show the user."""

    exit_code = 1


class Diverged(RunStopped):
    """The loss became NaN or infinite: the message names the step, the loss and the learning rate."""

    exit_code = EXIT_DIVERGED


class Preempted(RunStopped):
    """SIGTERM arrived: a checkpoint was written at the next step boundary on every rank; resume with resume=auto."""

    exit_code = EXIT_PREEMPTED

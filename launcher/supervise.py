"""Running torchrun as the launcher's child: signals passed on, output passed through, one line on how it ended.

torchrun runs in a process group of its own, so a signal meant for the job reaches it only through the launcher:
SIGTERM and SIGINT sent to the launcher go to torchrun, which hands them to every worker and waits for them
(``--shutdown-timeout`` seconds, then SIGKILL). A worker given SIGTERM writes a checkpoint at its next step boundary
and exits 75 (engine.errors.Preempted); nothing is left running when the launcher returns.

torchrun reports a failed worker with a traceback of its own and exits 1 whatever the workers' codes were. So each
worker also leaves its exit status in a directory the launcher made (``record_worker_exit``), and the launcher reads
torchrun's failure table for the ranks that died without one. From both it prints one line: which rank died and how,
and the command that continues the run; and it returns 75 when every rank stopped preempted (a scheduler requeues on
it), the failing worker's own code otherwise.

``--max-restarts N`` passes torchrun's option and sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default the
rendezvous hands restarted workers the agent's TCP store, still holding the keys of the failed round, and gloo's
connection set-up then fails; with it, every round gets a fresh store. Restarted workers continue from the run's
latest checkpoint because the launcher adds ``resume=auto`` to the workers' command.
"""

from __future__ import annotations

import codecs
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO

from engine.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED

STATUS_DIR_ENV = "SPARSETRAIN_WORKER_STATUS_DIR"
_TAIL_BYTES = 64 * 1024
# one entry of torchrun's failure table: "rank : 1 (local_rank: 1)" then "exitcode : -9 (pid: 123)"
_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def record_worker_exit(code: int) -> None:
    """In a worker the launcher started: leave this rank's exit status where the launcher looks for it."""
    directory, rank = os.environ.get(STATUS_DIR_ENV), os.environ.get("RANK")
    if not directory or rank is None or not os.path.isdir(directory):
        return
    try:
        with open(os.path.join(directory, f"rank{int(rank)}"), "w") as handle:
            handle.write(str(int(code)))
    except (OSError, ValueError):     # the status is a courtesy to the launcher; the exit code still stands
        pass


@dataclass
class Outcome:
    """How the workers ended: torchrun's code, each rank's recorded code, torchrun's failure table, a signal."""

    returncode: int
    statuses: dict[int, int]
    failures: list[tuple[int, int]]      # (rank, exit code) from torchrun's table, the root cause first
    forwarded: int | None                # the signal the launcher passed on, if any
    nproc: int
    run_dir: str | None = None           # the run directory rank 0 announced, if it got that far
    report: str | None = None            # where torchrun's own failure report was written, if it gave one


def _keep_report(lines: list[str], run_dir: str | None) -> str | None:
    """Write torchrun's failure report to <run dir>/logs/torchrun.log (a temporary file when the run directory is
    unknown or remote); returns its path."""
    if not lines:
        return None
    try:
        if run_dir and "://" not in run_dir:
            os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
            path = os.path.join(run_dir, "logs", "torchrun.log")
            with open(path, "a") as handle:
                handle.writelines(lines)
            return path
        handle_fd, path = tempfile.mkstemp(prefix="sparsetrain-torchrun-", suffix=".log")
        with os.fdopen(handle_fd, "w") as handle:
            handle.writelines(lines)
        return path
    except OSError:
        return None


def torchrun_command(nproc: int, max_restarts: int, worker_args: Sequence[str]) -> list[str]:
    """torchrun on this machine (a free port), starting ``python -m launcher train`` with ``worker_args``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if max_restarts:
        command.append(f"--max-restarts={max_restarts}")
    return [*command, "-m", "launcher", "train", *worker_args]


def run_torchrun(command: Sequence[str], nproc: int, max_restarts: int) -> Outcome:
    """Run torchrun in its own process group, passing SIGTERM/SIGINT on and its output through; wait for it."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")     # what torchrun sets anyway, without its banner saying so
    if max_restarts:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    status_dir = tempfile.mkdtemp(prefix="sparsetrain-workers-")
    env[STATUS_DIR_ENV] = status_dir
    forwarded: list[int] = []
    try:
        child = subprocess.Popen(list(command), env=env, start_new_session=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, preexec_fn=_term_when_parent_dies)
        tail, said, report = bytearray(), bytearray(), TorchrunReportFilter()
        pumps = [threading.Thread(target=_pump, args=(child.stdout, sys.stdout, said), daemon=True),
                 threading.Thread(target=_pump, args=(child.stderr, sys.stderr, tail, report), daemon=True)]
        for pump in pumps:
            pump.start()

        def forward(number: int, frame: FrameType | None) -> None:
            forwarded.append(number)
            try:
                os.killpg(child.pid, number)
            except ProcessLookupError:
                pass

        with _handlers((signal.SIGTERM, signal.SIGINT), forward):
            returncode = child.wait()
        for pump in pumps:
            pump.join()
        run_dir = announced_run_dir(said.decode("utf-8", "replace"))
        return Outcome(returncode=returncode, statuses=_read_statuses(status_dir), failures=parse_failures(
            tail.decode("utf-8", "replace")), forwarded=forwarded[0] if forwarded else None, nproc=nproc,
                       run_dir=run_dir, report=_keep_report(report.held, run_dir))
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def _term_when_parent_dies() -> None:
    """In torchrun, before it starts (Linux): SIGTERM when the launcher dies, even by SIGKILL, so the workers still
    checkpoint and stop instead of training on as orphans."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _handlers:
    """Install one handler for several signals (main thread only), putting the previous ones back on exit."""

    def __init__(self, numbers: Sequence[int], handler: signal.Handlers | object) -> None:
        self.numbers, self.handler = numbers, handler
        self.previous: dict[int, object] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {n: signal.signal(n, self.handler) for n in self.numbers}  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]


_TRACEBACK = "Traceback (most recent call last):"
_TORCHRUN_ERROR = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
_ELASTIC_LOG = re.compile(r"[DIWE]\d{4} \d\d:\d\d:\d\d\.\d+ \d+ \S*torch/distributed/elastic/")


class TorchrunReportFilter:
    """Passes a stream through, except torchrun's own report of a failed worker: the traceback of torchrun's main
    that ends in ``ChildFailedError`` and the ``====`` failure table after it, a page that says nothing the worker's
    one line and the launcher's closing line do not. Those lines are kept in ``held`` (for a log file).

    Text is passed on line by line (a progress-bar frame, which starts with a carriage return, at once); a traceback
    is held until its exception line shows whose it is, and any other traceback is passed on whole.
    """

    def __init__(self) -> None:
        self.held: list[str] = []
        self._pending = ""            # an incomplete line that may start a traceback
        self._block: list[str] = []   # the traceback being read
        self._rules = -1              # -1: no table; else the number of "====" lines of the table seen so far

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held back) to show now."""
        out: list[str] = []
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line + "\n", out)
        if self._pending.startswith("\r") and not self._block and self._rules < 0:
            out.append(self._pending)        # a progress frame (no newline): show it now
            self._pending = ""
        return "".join(out)

    def close(self) -> str:
        """Whatever is still held back that is not torchrun's report."""
        rest = "".join(self._block) + self._pending
        self._block, self._pending = [], ""
        return rest

    def _line(self, line: str, out: list[str]) -> None:
        if self._rules >= 0:                              # inside torchrun's failure table
            self.held.append(line)
            if line.startswith("===="):
                self._rules += 1
                if self._rules == 2:
                    self._rules = -1
            return
        if self._block:
            self._block.append(line)
            if line.startswith((" ", "\t")):             # frames and source lines of the traceback
                return
            if line.startswith(_TORCHRUN_ERROR):
                self.held += self._block
                self._rules = 0
            else:
                out.extend(self._block)
            self._block = []
            return
        if line.rstrip("\n") == _TRACEBACK:
            self._block = [line]
            return
        if _ELASTIC_LOG.match(line):     # torchrun's own log lines (closing signals, "failed (exitcode ...)")
            self.held.append(line)
            return
        out.append(line)


def _pump(source: IO[bytes] | None, target: IO[str], tail: bytearray | None,
          report: TorchrunReportFilter | None = None) -> None:
    """Copy a child's output as it comes (progress bars too), keeping the last bytes of it in ``tail`` and, with
    ``report``, leaving out torchrun's own failure report."""
    if source is None:
        return
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    fd = source.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if tail is not None and chunk:
            tail += chunk
            del tail[:-_TAIL_BYTES]
        text = decoder.decode(chunk, final=not chunk)
        if report is not None:
            text = report.feed(text) + (report.close() if not chunk else "")
        try:
            target.write(text)
            target.flush()
        except (OSError, ValueError):    # our own output is gone (a closed pipe): keep draining the child's
            pass
        if not chunk:
            break


def _read_statuses(directory: str) -> dict[int, int]:
    statuses = {}
    for name in os.listdir(directory):
        if name.startswith("rank"):
            try:
                with open(os.path.join(directory, name)) as handle:
                    statuses[int(name[4:])] = int(handle.read().strip())
            except (OSError, ValueError):
                continue
    return statuses


def parse_failures(text: str) -> list[tuple[int, int]]:
    """(rank, exit code) of each failed worker in torchrun's last failure table, the root cause first."""
    table = text[text.rfind("Failures:"):] if "Failures:" in text else text
    root = table.find("Root Cause")
    entries = [(int(r), int(c)) for r, c in _FAILURE.findall(table[root:] if root >= 0 else "")]
    entries += [(int(r), int(c)) for r, c in _FAILURE.findall(table[:root] if root >= 0 else table)]
    seen: set[int] = set()
    return [(r, c) for r, c in entries if not (r in seen or seen.add(r))]


def announced_run_dir(text: str) -> str | None:
    """The run directory from rank 0's start-up line ("run directory: ...") or its resume line ("resumed from
    <run dir>/checkpoints/<file>"), whichever came last."""
    found = None
    for match in re.finditer(r"run directory: (\S+)|resumed from (\S+)/checkpoints/\S+", text):
        found = match.group(1) or match.group(2)
    return found


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def conclude(outcome: Outcome, resume_command: str) -> tuple[int, str | None]:
    """(exit status for the launcher, the one line to print or None) for how the workers ended."""
    codes = [outcome.statuses.get(rank) for rank in range(outcome.nproc)]
    if codes and all(code == EXIT_PREEMPTED for code in codes):
        return EXIT_PREEMPTED, (f"preempted: every rank saved a checkpoint and stopped (exit {EXIT_PREEMPTED}); "
                                f"continue with: {resume_command}")
    if outcome.returncode == 0 or (codes and all(code == 0 for code in codes)):
        return 0, None    # every rank finished (a signal that came after the last step changes nothing)
    if outcome.forwarded is not None and not outcome.failures:
        name = signal.Signals(outcome.forwarded).name
        return 128 + outcome.forwarded, f"stopped by {name}; continue from the last checkpoint with: {resume_command}"
    died = [(rank, code) for rank, code in outcome.failures if rank not in outcome.statuses]
    first = died[0] if died else (outcome.failures[0] if outcome.failures else None)
    if first is None:
        silent = [rank for rank in range(outcome.nproc) if rank not in outcome.statuses]
        what = f"rank {silent[0]} ended without a status" if silent else "the workers failed"
        return (outcome.returncode or 1), (f"{what} (torchrun exit {outcome.returncode}); continue from the last "
                                           f"checkpoint with: {resume_command}")
    rank, code = first
    if code in (EXIT_BAD_INPUT, EXIT_DIVERGED):
        return code, None      # the rank's own line said what was wrong and what to change; resuming would not help
    others = [f"rank {r} {_how(c)}" for r, c in outcome.failures if r != rank]
    also = f" ({'; '.join(others)})" if others else ""
    status = code if code > 0 else (outcome.returncode or 1)
    where = f" (torchrun's report: {outcome.report})" if outcome.report else ""
    return status, (f"rank {rank} {_how(code)} and the job stopped{also}{where}; continue from the last checkpoint "
                    f"with: {resume_command}")


def resume_command(config: str | None, overrides: Sequence[str], nproc: int, max_restarts: int,
                   run_dir: str | None = None, default_run_dir: str | None = None) -> str:
    """The user's command continuing the run: ``resume=auto`` when the run lives where auto looks
    (``default_run_dir``, <output_dir>/<name>) or is unknown, else ``resume=<run_dir>``."""
    kept = [item for item in overrides if not item.split("=", 1)[0].strip() == "resume"]
    target = run_dir if run_dir and default_run_dir and run_dir.rstrip("/") != default_run_dir.rstrip("/") \
        else "auto"
    words = ["python", "-m", "launcher", "train", *([config] if config else []), *kept, f"resume={target}",
             f"--nproc-per-node={nproc}"]
    if max_restarts:
        words.append(f"--max-restarts={max_restarts}")
    return shlex.join(words)

"""Faults in 2-rank CPU jobs started by the launcher: a rank killed at a seeded random step under --max-restarts 1
(the run finishes by itself, bit-identical), SIGTERM to the launcher (exit 75, then resume=auto, bit-identical) and
a frozen rank with a short collective timeout (a clear message naming it, well before torch's 30 minutes).

Faults come from tests/faults/sitecustomize.py, put on the workers' PYTHONPATH. The supervision helpers that need no
processes are checked first.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpointer, load_state
from launcher.supervise import Outcome, TorchrunReportFilter, conclude, parse_failures, resume_command

REPO = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"
STEPS = 5            # per epoch, 2 epochs
RUN = ["model.name=mlp", "model.options.hidden=[16]", "data.batch_size=32", "data.augment=standard",
       "sparsity.method=set", "sparsity.density=0.3", "sparsity.period=2", "train.epochs=2",
       f"train.max_steps_per_epoch={STEPS}", "monitor.progress=false", "monitor.tensorboard=false",
       "checkpoint.keep=20"]

TORCHRUN_TABLE = """
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
launcher FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-02_15:25:53
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 9433)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_15:25:23
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 9432)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 9432
============================================================
"""


def test_torchruns_failure_table_and_the_line_the_launcher_prints() -> None:
    assert parse_failures(TORCHRUN_TABLE) == [(1, -9), (0, 1)]
    again = resume_command("c.yaml", ["name=x", "resume=/old"], 2, 0)
    assert again == "python -m launcher train c.yaml name=x resume=auto --nproc-per-node=2"
    assert resume_command(None, ["name=x"], 2, 1, "runs/x-2", "runs/x").endswith(
        "name=x resume=runs/x-2 --nproc-per-node=2 --max-restarts=1")
    code, line = conclude(Outcome(1, {0: 1}, parse_failures(TORCHRUN_TABLE), None, 2), again)
    assert code == 1 and line is not None
    assert line.startswith("rank 1 was killed by SIGKILL and the job stopped (rank 0 exited with status 1)")
    assert line.endswith(f"continue from the last checkpoint with: {again}")
    assert conclude(Outcome(1, {0: 75, 1: 75}, [], signal.SIGTERM, 2), again)[0] == 75
    assert conclude(Outcome(1, {0: 75}, [], signal.SIGTERM, 2), again)[0] == 128 + signal.SIGTERM
    assert conclude(Outcome(0, {0: 0, 1: 0}, [], None, 2), again) == (0, None)
    assert conclude(Outcome(1, {0: 0, 1: 0}, [], signal.SIGTERM, 2), again) == (0, None)   # finished first
    assert conclude(Outcome(1, {0: 3, 1: 3}, [(0, 3), (1, 3)], None, 2), again)[0] == 3   # diverged passes through


def test_torchruns_own_report_is_left_out_and_kept_for_the_log() -> None:
    """What a 2-rank failure prints through torchrun: the workers' lines and progress frames pass, torchrun's
    traceback, failure table and log lines are held back (for logs/torchrun.log); another traceback passes whole."""
    torchrun_tb = ("Traceback (most recent call last):\n  File \"/x/torch/distributed/run.py\", line 9, in main\n"
                   "    run(args)\n")
    elastic_log = ("W1202 16:42:44.679000 13524 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] "
                   "Sending process 13540 closing signal SIGTERM\n")
    other_tb = "Traceback (most recent call last):\n  File \"a.py\", line 1, in f\nValueError: boom\n"
    stream = ("\repoch 1/2:  50%|#####     | 1/2" + "\rdone\n" + "config error: bad value\n" + other_tb + elastic_log
              + torchrun_tb + TORCHRUN_TABLE.lstrip("\n") + "after\n")
    shown_parts, report = [], TorchrunReportFilter()
    for start in range(0, len(stream), 7):          # in small chunks, as a pipe delivers it
        shown_parts.append(report.feed(stream[start:start + 7]))
    shown = "".join(shown_parts) + report.close()
    assert shown == "\repoch 1/2:  50%|#####     | 1/2\rdone\nconfig error: bad value\n" + other_tb + "after\n"
    held = "".join(report.held)
    assert held == elastic_log + torchrun_tb + TORCHRUN_TABLE.lstrip("\n")
    assert report.feed("\rframe") == "\rframe"    # a progress frame without a newline is shown at once
    # a rank refusing its input (2) or diverging (3) said why in its own line: no resume hint
    assert conclude(Outcome(1, {0: 2}, [(0, 2)], None, 2), "again") == (2, None)


def test_roll_call_names_the_ranks_that_do_not_check_in() -> None:
    import torch.distributed as dist

    from engine.backends.ddp import is_communication_error, silent_ranks

    store = dist.HashStore()
    store.set("sparsetrain/alive/t/2", "1")           # rank 2 checked in; rank 1 never does
    assert silent_ranks(store, "t", 0, 3, wait_s=0.3) == [1]
    assert silent_ranks(store, "u", 0, 1, wait_s=0.3) == []
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv")
    assert is_communication_error(gloo) and is_communication_error(dist.DistBackendError("NCCL watchdog"))
    assert not is_communication_error(RuntimeError("DataLoader timed out after 5 seconds"))
    assert not is_communication_error(ValueError("gloo"))


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{FAULTS}{os.pathsep}{REPO}",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "15", **extra}


def _launch(out: Path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "launcher", "train", "--nproc-per-node", "2", *RUN,
                             f"output_dir={out}", f"name={name}", *args], cwd=REPO, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _why(err: str) -> str:
    """The workers' own error lines first (torchrun's table fills the tail), then the tail."""
    lines = [line for line in err.splitlines() if "error" in line.lower() and "elastic" not in line]
    return "\n".join(lines[-10:]) + "\n...\n" + err[-2000:]


def _final(run_dir: Path) -> dict:
    latest = Checkpointer(str(run_dir / "checkpoints")).latest()
    assert latest is not None, f"no checkpoint in {run_dir}"
    return load_state(latest)


def _assert_same(a: dict, b: dict) -> None:
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 2 * STEPS)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, mask in a["masks"].items():
        assert torch.equal(mask, b["masks"][name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted 2-rank run every fault is compared with."""
    out = tmp_path_factory.mktemp("straight")
    job = _launch(out, "straight")
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, _why(err)
    return _final(out / "straight")


@pytest.mark.slow
def test_killed_rank_is_restarted_and_the_run_finishes_bit_identical(tmp_path: Path, straight: dict) -> None:
    step = random.Random(20261202).randint(2, 2 * STEPS - 1)       # a seeded random step, mid-run
    job = _launch(tmp_path, "elastic", "--max-restarts", "1", "checkpoint.every_steps=2",
                  env=_env(SPARSETRAIN_FAULT=f"1:{step}:kill"))
    out, err = job.communicate(timeout=400)
    assert job.returncode == 0, _why(err)
    assert "resumed from" in out                          # the restarted workers continued from a checkpoint
    _assert_same(straight, _final(tmp_path / "elastic"))


@pytest.mark.slow
def test_sigterm_to_the_launcher_preempts_then_resume_is_bit_identical(tmp_path: Path, straight: dict) -> None:
    mark = tmp_path / "reached"
    job = _launch(tmp_path, "preempt", env=_env(SPARSETRAIN_FAULT="0:3:mark", SPARSETRAIN_FAULT_MARK=str(mark)))
    deadline = time.monotonic() + 240
    while not mark.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mark.exists(), _why(job.communicate()[1])
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 75, _why(err)
    assert "preempted" in err and "resume=auto" in err
    saved = _final(tmp_path / "preempt")
    assert 3 <= saved["step"] < 2 * STEPS                 # stopped mid-run, at a step boundary
    again = _launch(tmp_path, "preempt", "resume=auto")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, _why(err)
    _assert_same(straight, _final(tmp_path / "preempt"))


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    job = _launch(tmp_path, "one", env=_env(SPARSETRAIN_FAULT="1:2:term"))
    _, err = job.communicate(timeout=300)
    assert job.returncode == 75, _why(err)           # both ranks exited 75: the launcher passes it through
    saved = _final(tmp_path / "one")
    # the next vote: at the latest the one at the epoch's last step
    assert 2 <= saved["step"] <= STEPS and saved["position"]["steps"] == saved["step"]
    assert "preempted" in err


@pytest.mark.slow
def test_frozen_rank_ends_the_job_within_the_timeout_naming_it(tmp_path: Path) -> None:
    started = time.monotonic()
    job = _launch(tmp_path, "frozen", "parallel.timeout_minutes=0.1", env=_env(SPARSETRAIN_FAULT="1:3:stop"))
    _, err = job.communicate(timeout=300)
    elapsed = time.monotonic() - started
    assert job.returncode not in (0, 75), _why(err)
    assert "rank 1 stopped answering" in err and "parallel.timeout_minutes=0.1" in err
    assert "rank 1 was killed by SIGKILL" in err          # torchrun cleared the frozen rank away; the launcher says so
    assert elapsed < 150                                  # 6 s timeout + roll call + shutdown, not 30 minutes

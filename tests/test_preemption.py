"""Preemption and mid-epoch checkpoints in one process: SIGTERM stops at a step boundary with a checkpoint (exit 75),
``checkpoint.every_steps`` saves mid-epoch, and a run resumed from either ends bit-identical to one never stopped."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpointer, load_state
from engine.data.samplers import EpochDistributedSampler, EpochShuffleSampler
from engine.errors import EXIT_PREEMPTED, Preempted
from engine.preemption import PreemptionSignal
from engine.run_config import load_config
from engine.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")

# random augmentation and a mask that changes during training: every RNG and every piece of state must come back
SMALL = ["data.name=digits", "data.batch_size=64", "data.augment=standard", "model.name=mlp",
         "model.options.hidden=[32]", "optim.lr=0.05", "sparsity.method=set", "sparsity.density=0.3",
         "sparsity.period=2", "monitor.progress=false", "monitor.tensorboard=false",
         "train.max_steps_per_epoch=7", "train.epochs=2", "checkpoint.keep=20"]


def run(*overrides: str) -> dict:
    return train(load_config(None, [*SMALL, *overrides]))


def final_state(run_dir: str) -> dict:
    latest = Checkpointer(f"{run_dir}/checkpoints").latest()
    assert latest is not None
    return load_state(latest)


def assert_same_run(a: dict, b: dict) -> None:
    """Weights, masks, optimizer state and counters equal bit for bit."""
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, mask in a["masks"].items():
        assert torch.equal(mask, b["masks"][name]), name
    for key, slot in a["optimizer"]["state"].items():
        for field, value in slot.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][field])), field


def epoch_lines(text: str) -> list[str]:
    """The per-epoch console lines without the throughput (which differs run to run)."""
    return [re.sub(r", [\d.]+ samples/s", "", line) for line in text.splitlines() if re.match(r"epoch \d+/", line)]


def stop_at(monkeypatch: pytest.MonkeyPatch, step: int, how: str) -> None:
    """At optimizer step ``step``: 'sigterm' signals this process (the real handler sets the flag), 'crash' raises
    as a killed process would stop, after the boundary's own work."""
    original = Trainer._step_boundary

    def boundary(self: Trainer, where, **options):  # type: ignore[no-untyped-def]
        if self.step == step and how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, where, **options)
        if self.step == step and how == "crash":
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Trainer, "_step_boundary", boundary)


def test_sigterm_checkpoints_at_the_step_and_resume_is_bit_identical(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    straight = run(f"output_dir={tmp_path}", "name=straight")
    straight_lines = epoch_lines(capsys.readouterr().out)
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        stop_at(patch, 10, "sigterm")     # mid-way through the second epoch
        with pytest.raises(Preempted) as stopped:
            run(f"output_dir={tmp_path}", "name=cut", "resume=auto")
    assert stopped.value.exit_code == EXIT_PREEMPTED == 75
    assert "step 10" in str(stopped.value) and "resume=auto" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is before      # the handler lived only as long as the run
    saved = load_state(Checkpointer(str(tmp_path / "cut" / "checkpoints")).latest())
    assert (saved["epoch"], saved["step"]) == (1, 10)
    assert saved["position"]["batches"] == saved["position"]["steps"] == 3
    resumed = run(f"output_dir={tmp_path}", "name=cut", "resume=auto")
    assert resumed["steps"] == straight["steps"] == 14 and resumed["test_acc"] == straight["test_acc"]
    assert_same_run(final_state(straight["run_dir"]), final_state(resumed["run_dir"]))
    # the second epoch's train loss and accuracy span the save: the resumed run reports the whole epoch's
    assert epoch_lines(capsys.readouterr().out)[-1] == straight_lines[-1]


def test_every_steps_mid_epoch_resume_after_a_crash_is_bit_identical(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = run(f"output_dir={tmp_path}", "name=straight")
    with monkeypatch.context() as patch:
        stop_at(patch, 5, "crash")
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(f"output_dir={tmp_path}", "name=crash", "resume=auto", "checkpoint.every_steps=4")
    names = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").glob("ckpt-*.pt"))
    assert names == ["ckpt-e0000-s00000004.pt"]              # mid-epoch: epoch 0 not finished
    resumed = run(f"output_dir={tmp_path}", "name=crash", "resume=auto", "checkpoint.every_steps=4")
    assert resumed["steps"] == 14
    assert_same_run(final_state(straight["run_dir"]), final_state(resumed["run_dir"]))
    names = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").glob("ckpt-*.pt"))
    assert "ckpt-e0001-s00000008.pt" in names and "ckpt-e0001-s00000007.pt" in names


def test_every_steps_is_checked_before_any_worker_starts() -> None:
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint\.every_steps must be >= 1, got 0"):
        load_config(None, ["checkpoint.every_steps=0"])


def test_preemption_signal_restores_the_previous_handler() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: seen.append(number))
    try:
        flag = PreemptionSignal()
        with flag.installed():
            os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signal_number == signal.SIGTERM and not seen
        os.kill(os.getpid(), signal.SIGTERM)    # the caller's handler is back
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_samplers_skip_exactly_the_consumed_samples_once() -> None:
    single = EpochShuffleSampler(20, seed=3)
    single.set_epoch(2)
    whole = list(single)
    single.skip_next(8)
    assert list(single) == whole[8:]
    assert list(single) == whole        # only the next pass is shortened
    ranks = [EpochDistributedSampler(range(21), num_replicas=2, rank=r, shuffle=True, seed=5, drop_last=True)
             for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(1)
        whole = list(sampler)
        sampler.skip_next(4)
        assert list(sampler) == whole[4:] and len(whole) == 10
    with pytest.raises(ValueError, match="negative"):
        single.skip_next(-1)


def test_ranks_vote_about_once_a_second_and_never_act_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vote cadence on a stand-in for 2 ranks: the all-reduce doubles (both ranks report the same)."""
    import types

    import engine.trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])
    reduced: list[list[float]] = []

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        reduced.append(tensor.tolist())
        return tensor.mul_(2)

    fake = types.SimpleNamespace(env=types.SimpleNamespace(world_size=2), preemption=PreemptionSignal(),
                                 backend=types.SimpleNamespace(all_reduce=all_reduce), device=torch.device("cpu"),
                                 _vote_every=1, _steps_to_vote=1, _vote_clock=0.0)
    vote = lambda last=False: Trainer._preemption_vote(fake, last)  # noqa: E731
    clock[0] = 0.01                       # first step: 10 ms -> the next vote in 100 steps (1 s)
    assert vote() is False and fake._vote_every == 100 and len(reduced) == 1
    fake.preemption.request()
    for _ in range(10):                   # the flag is set, but no rank may act on it alone between votes
        clock[0] += 0.01
        assert vote() is False
    assert len(reduced) == 1
    clock[0] += 0.01
    assert vote(last=True) is True        # an epoch's last step always votes
    assert reduced[-1][0] == 1.0 and reduced[-1][1] == pytest.approx(0.11)
    assert fake._vote_every == 100        # 0.11 s over 11 steps: still 10 ms a step

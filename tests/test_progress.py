"""Monitor.progress: tqdm frames on a terminal, one plain line per epoch in a log file or a batch job's output."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

import engine.monitor as monitor_module
from engine.monitor import Monitor


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _monitor(tmp_path: Path) -> Monitor:
    return Monitor(str(tmp_path / "run"), enabled=True, tensorboard=False, progress=True)


def test_log_output_gets_one_line_per_epoch_and_no_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monitor = _monitor(tmp_path)
    for epoch in (1, 2):
        with monitor.progress(total=4, desc=f"epoch {epoch}/2") as bar:
            bar.update()
            bar.set_postfix({"loss": 0.25, "lr": 0.1})
            bar.update(3)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2
    for epoch, line in zip((1, 2), lines):
        assert re.fullmatch(rf"epoch {epoch}/2: 4/4 steps in \d+\.\d s( \(\d+\.\d\d steps/s\))?, loss 0\.25, lr 0\.1",
                            line), line


def test_an_interrupted_epoch_still_reports_its_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyboardInterrupt):
        with _monitor(tmp_path).progress(total=10, desc="epoch 1/1") as bar:
            bar.update(3)
            raise KeyboardInterrupt
    assert capsys.readouterr().err.startswith("epoch 1/1: 3/10 steps in ")


def test_a_terminal_gets_the_tqdm_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with _monitor(tmp_path).progress(total=2, desc="epoch 1/1") as bar:
        bar.update(2)
    text = terminal.getvalue()
    assert "\r" in text and "epoch 1/1" in text and "steps in" not in text


def test_a_stderr_without_isatty_counts_as_a_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Bare:                       # a stream wrapper without isatty (some job runners install one)
        def __init__(self) -> None:
            self.parts: list[str] = []

        def write(self, text: str) -> int:
            self.parts.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    bare = Bare()
    monkeypatch.setattr(sys, "stderr", bare)
    with _monitor(tmp_path).progress(total=1, desc="epoch 1/1") as bar:
        bar.update()
    assert "".join(bare.parts).startswith("epoch 1/1: 1/1 steps in ")


def test_a_long_epoch_in_a_log_gets_heartbeat_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside an epoch longer than the heartbeat, the log shows progress before the epoch's closing line."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(monitor_module._LineBar, "heartbeat_s", 0.0)
    with _monitor(tmp_path) as monitor:
        with monitor.progress(total=3, desc="epoch 1/1") as bar:
            for _ in range(3):
                bar.update()
    lines = sys.stderr.getvalue().splitlines()
    assert [line.split(" steps")[0] for line in lines] == ["epoch 1/1: 1/3", "epoch 1/1: 2/3", "epoch 1/1: 3/3"]
    assert "after" in lines[0] and "in" in lines[2]

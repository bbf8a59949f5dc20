"""Every shell command in README.md and docs/*.md works as written, or is skipped by an explicit rule with a reason.

Commands are read from fenced code blocks (``bash``, ``sh`` or untagged): a line whose program is one of PROGRAMS,
with backslash continuations joined, comments dropped and ``&&`` chains split. Each is checked as far as this machine
allows, cheaply and in-process:

- ``python -m launcher CMD ...`` (also under torchrun, the deepspeed launcher, ``ray job submit``, as ``sparsetrain``):
  CMD exists and accepts every ``--flag`` used; the config file exists; train runs with ``--print-config`` (the
  config parses; a data set that is not on this machine may fail the data check, never the config check); tune runs
  with ``--check``; other commands' configs load. A documented ``# config error: ...`` line under a command is the
  error it must print. Commands with placeholders (CONFIG, RUN_DIR, $VAR, a|b) check their files and flags only.
- ``python -m benchmarks.NAME ...``: the module exists and its ``--help`` lists every flag used.
- ``bash FILE``: the file exists.
- installs and the test suite itself are skipped (SKIPPED says why).

The slow set runs the commands of RUN_IN_FULL to the end, as written.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = {"python", "python3", "torchrun", "deepspeed", "sparsetrain", "bash", "ray", "pip", "pip3"}
SKIPPED = {   # (program, first argument) -> why the test does not run it
    ("python", "-m pip"): "installs packages", ("python3", "-m pip"): "installs packages",
    ("pip", ""): "installs packages", ("pip3", ""): "installs packages",
    ("python", "-m pytest"): "the test suite itself", ("python3", "-m pytest"): "the test suite itself",
}
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]{2,}(:\d+)?$|\$|\||^\[")


@dataclass(frozen=True)
class Command:
    """One documented command: where it is, its words (environment assignments dropped), the error it documents."""

    where: str
    words: tuple[str, ...]
    expected_error: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def _blocks(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced block that may hold shell commands."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start, tag = None, ""
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if not fence:
            continue
        if start is None:
            start, tag = number, fence.group(1)
        else:
            if tag in ("", "bash", "sh", "shell", "console"):
                yield start + 1, lines[start:number - 1]
            start = None


def collect() -> list[Command]:
    """Every command of the README and docs, in order."""
    found: list[Command] = []
    for path in DOCS:
        for first, lines in _blocks(path):
            pending, at = "", first
            for offset, line in enumerate(lines):
                if not pending:
                    at = first + offset
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                text, pending = pending + line, ""
                comment = text.strip()
                if comment.startswith("# config error:") and found and found[-1].where.startswith(path.name):
                    message = comment[2:].split("...")[0].rstrip(" ,")
                    found[-1] = Command(found[-1].where, found[-1].words, message)
                    continue
                try:
                    words = shlex.split(text, comments=True)
                except ValueError:          # not shell (a diagram, prose)
                    continue
                where = f"{path.relative_to(REPO).as_posix()}:{at}"
                for part in _split_chain(words):
                    while part and _ENV.match(part[0]):
                        part = part[1:]
                    if part and part[0] in PROGRAMS:
                        found.append(Command(where, tuple(part)))
    return found


def _split_chain(words: list[str]) -> Iterator[list[str]]:
    part: list[str] = []
    for word in words:
        if word in ("&&", ";", "||"):
            yield part
            part = []
        else:
            part.append(word)
    yield part


def _launcher_args(words: tuple[str, ...]) -> tuple[str, ...] | None:
    """The arguments after `launcher` however it is started, or None when the command does not start the launcher."""
    if words[0] == "sparsetrain":
        return words[1:]
    if words[0] == "ray" and "--" in words:
        return _launcher_args(words[words.index("--") + 1:])
    for marker in (("-m", "launcher"), ("--module", "launcher")):
        for i in range(len(words) - 1):
            if words[i:i + 2] == marker:
                return words[i + 2:]
    return None


def _benchmark(words: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    if words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m" and words[2].startswith("benchmarks."):
        return words[2].removeprefix("benchmarks."), words[3:]
    return None


def _skip_reason(words: tuple[str, ...]) -> str | None:
    first = " ".join(words[1:3]) if words[0] in ("python", "python3") else ""
    return SKIPPED.get((words[0], first))


COMMANDS = collect()


def test_the_docs_hold_the_commands_this_test_is_for() -> None:
    """Guards the collector: if it silently found nothing, every other test here would pass vacuously."""
    texts = [shlex.join(c.words) for c in COMMANDS]
    assert "python3 -m launcher train configs/quickstart.yaml" in texts
    assert any(c.expected_error for c in COMMANDS)
    assert sum(_launcher_args(c.words) is not None for c in COMMANDS) >= 15
    assert sum(_benchmark(c.words) is not None for c in COMMANDS) >= 5


def _flags(args: tuple[str, ...]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def _help(run: callable, capsys: pytest.CaptureFixture[str]) -> str:  # type: ignore[valid-type]
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code in (0, None)
    return capsys.readouterr().out


def _is_placeholder(word: str) -> bool:
    return bool(_PLACEHOLDER.search(word))


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command(command: Command, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                            tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    words = command.words
    reason = _skip_reason(words)
    if reason:
        pytest.skip(reason)
    if words[0] == "bash":
        assert (REPO / words[1]).is_file(), f"{command}: no such script"
        return
    bench = _benchmark(words)
    if bench is not None:
        _check_benchmark(command, *bench, capsys, monkeypatch)
        return
    args = _launcher_args(words)
    assert args is not None, f"{command}: no rule for this command; teach tests/test_readme_commands.py about it"
    _check_launcher(command, args, capsys, tmp_path)


def _check_benchmark(command: Command, name: str, args: tuple[str, ...], capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert (REPO / "benchmarks" / f"{name}.py").is_file(), f"{command}: no module benchmarks/{name}.py"
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"benchmarks.{name}", "--help"])
    text = _help(module.main, capsys)
    for flag in _flags(args):
        assert re.search(rf"{re.escape(flag)}\b", text), f"{command}: {flag} is not an option of benchmarks.{name}"


def _check_launcher(command: Command, args: tuple[str, ...], capsys: pytest.CaptureFixture[str],
                    tmp_path: Path) -> None:
    from launcher.cli import main

    if not args or args[0].startswith("-"):            # `sparsetrain --help`
        assert "--help" in args, f"{command}: no rule for launcher options without a command"
        _help(lambda: main(list(args)), capsys)
        return
    sub, rest = args[0], args[1:]
    text = _help(lambda: main([sub, "--help"]), capsys)
    for flag in _flags(rest):
        assert re.search(rf"{re.escape(flag)}\b", text), f"{command}: {flag} is not an option of {sub}"
    configs = [a for a in rest if a.endswith((".yaml", ".yml")) and not _is_placeholder(a)]
    for config in configs:
        assert (REPO / config).is_file(), f"{command}: no config file {config}"
    if any(_is_placeholder(a) for a in rest) or sub in ("evaluate", "export", "report"):
        return   # a template, or a command that needs a finished run: files and flags are what can be checked here
    positional = [a for a in rest if not a.startswith("--")]
    if sub == "train":
        extra = [] if "--print-config" in rest else ["--print-config"]
        code = main(["train", *rest, *extra])
    elif sub == "tune":
        code = main(["tune", *rest, "--check"])
    else:                                 # prune, lottery: their own runs are long; the config must load
        from engine.run_config import load_config

        load_config(configs[0] if configs else None, [a for a in positional if "=" in a])
        return
    err = capsys.readouterr().err.strip()
    if command.expected_error is not None:
        assert code == 2 and err.startswith(command.expected_error), f"{command}: printed {err!r}"
        return
    data_missing = code == 2 and err.startswith("data error:") and "\n" not in err   # data sets not on this machine
    assert code == 0 or data_missing, f"{command}: exit {code}: {err[-2000:]}"


# Documented commands that run in full, as written (their run directories go under tmp_path), in the slow set: each
# takes 30 s to a few minutes here. A doc that changes one of these lines must change it here too.
RUN_IN_FULL = [
    "python3 -m launcher train configs/quickstart.yaml",
    "python3 -m launcher train configs/quickstart.yaml --nproc-per-node 2",
    "python -m launcher train configs/stripping/digits_demo.yaml",
]


@pytest.mark.slow
@pytest.mark.parametrize("text", RUN_IN_FULL)
def test_documented_run_completes(text: str, tmp_path: Path) -> None:
    """In a subprocess as a user starts it; the output is a pipe, so no progress-bar frames either."""
    assert text in {shlex.join(c.words) for c in COMMANDS}, f"{text!r} is no longer in the docs"
    words = shlex.split(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *words[1:], f"output_dir={tmp_path}"], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["steps"] > 0 and summary["test_acc"] > 0.5
    assert "\r" not in result.stderr


@pytest.mark.parametrize(("words", "expected_error", "complaint"), [
    (("python", "-m", "launcher", "train", "configs/no_such.yaml"), None, "no config file configs/no_such.yaml"),
    (("python", "-m", "launcher", "train", "configs/quickstart.yaml", "--no-such-flag"), None,
     "--no-such-flag is not an option of train"),
    (("python", "-m", "launcher", "train", "configs/quickstart.yaml", "optim.lrr=0.1"), None, "exit 2"),
    (("python", "-m", "launcher", "train", "configs/quickstart.yaml", "optim.lrr=0.1"), "config error: unknown key "
     "'optim.lr'", "printed"),
    (("python", "-m", "launcher", "tune", "configs/sweeps/set_digits.yaml", "no_such_key=1"), None, "exit 2"),
    (("python", "-m", "benchmarks.masked_step", "--no-such-flag"), None,
     "--no-such-flag is not an option of benchmarks.masked_step"),
    (("python", "-m", "benchmarks.no_such_benchmark"), None, "no module benchmarks/no_such_benchmark.py"),
    (("python", "-m", "launcher", "no_such_command"), None, ""),
])
def test_a_broken_command_fails(words: tuple[str, ...], expected_error: str | None, complaint: str,
                                capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                tmp_path: Path) -> None:
    """The checks above can fail: each broken variant of a documented command is caught, with a message that says
    what broke."""
    with pytest.raises(AssertionError) as info:
        test_documented_command(Command("doc.md:1", words, expected_error), capsys, monkeypatch, tmp_path)
    assert complaint in str(info.value)

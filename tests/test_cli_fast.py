"""``python -m launcher --help`` answers without importing torch; the chosen command still gets its full parser."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import LAZY_COMMANDS, main, parser

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "numpy", "fsspec", "engine.run_config", "launcher.common")

PROBE = """
import sys
from launcher.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("loaded:", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["report", "--help"]])
def test_help_imports_no_torch(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: python -m launcher" in result.stdout
    assert result.stdout.rstrip().endswith("loaded: []"), result.stdout[-500:]


def _command_helps(root: argparse.ArgumentParser) -> dict[str, str | None]:
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action.help for action in commands._choices_actions}


def test_listed_help_lines_are_the_modules_own() -> None:
    light, full = _command_helps(parser(full=())), _command_helps(parser())
    assert light == full
    assert set(light) == {"train", "report", *(name for name, *_ in LAZY_COMMANDS)}


def test_a_chosen_command_gets_its_full_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["prune", "--help"])
    assert stop.value.code == 0 and "--compressions" in capsys.readouterr().out

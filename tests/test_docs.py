"""The README and docs/ stand on their own: no tracker issue numbers, no paths of the machine they were written on.

A reader of a clone has neither the issue tracker's numbering nor the authors' directories; each hit names the file,
the line and what to write instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# (pattern, what is wrong and the fix)
FORBIDDEN: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE), "an issue number: say what the section is about instead"),
    (re.compile(r"\(issue\b", re.IGNORECASE), "an issue reference: say what the section is about instead"),
    (re.compile(r"(?<![\w&/])#\d+\b"), "a tracker number (#N): describe the change instead"),
    (re.compile(r"\bthe issue(?:'s)?\b", re.IGNORECASE), "'the issue': name the goal or the recipe itself"),
    (re.compile(r"(?<![\w.])\.\./"), "a path above the repository: name the source, or copy what is needed in"),
    (re.compile(r"(?<![\w.~-])/(?:tmp|work|root|home|Users)/"),
     "a machine's own path: use a relative path or $(mktemp -d)"),
    (re.compile(r"\b(?:ALGORITHMS|DESIGN)\.md\b"), "a planning file outside the repository: name the source instead"),
]


def _hits(text: str) -> list[tuple[int, str, str]]:
    return [(number, match.group(0), why) for number, line in enumerate(text.splitlines(), 1)
            for pattern, why in FORBIDDEN for match in pattern.finditer(line)]


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(REPO).as_posix() for p in DOCS])
def test_docs_name_no_issue_numbers_and_no_outside_paths(path: Path) -> None:
    hits = _hits(path.read_text(encoding="utf-8"))
    assert not hits, "\n".join(f"{path.relative_to(REPO)}:{n}: {found!r} is {why}" for n, found, why in hits)


@pytest.mark.parametrize(("text", "found"), [
    ("## Export speed (issue 16)", ["issue 16", "(issue"]),
    ("fixed in #12, see issues 3", ["issues 3", "#12"]),
    ("as the issue's recipe says", ["the issue's"]),
    ("see `../shared/DESIGN.md`", ["../", "DESIGN.md"]),
    ("python -m benchmarks.x --out /tmp/gpu", ["/tmp/"]),
    ("cd /work/main && make", ["/work/"]),
])
def test_the_rules_catch_what_they_are_for(text: str, found: list[str]) -> None:
    assert sorted(hit for _, hit, _ in _hits(text)) == sorted(found)


@pytest.mark.parametrize("text", [
    "# A heading", "a DDP forward would issue collectives", "data.root=/data", "--against-reference ~/Synaptic-Flow",
    "see docs/design.md and [docs](docs/design.md)", "runs/quickstart/config.yaml", "&#8212;", "C#11 is fine",
])
def test_the_rules_leave_ordinary_text_alone(text: str) -> None:
    assert _hits(text) == []

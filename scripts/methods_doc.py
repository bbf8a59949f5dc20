"""Write docs/methods.md, the reference of every sparsity method's keys, from the config classes themselves.

    python -m scripts.methods_doc            # rewrite docs/methods.md
    python -m scripts.methods_doc --check    # exit 1 when docs/methods.md is stale (tests/test_methods_doc.py)

A key's meaning comes from its config class, by one of two conventions (the first found along the class's bases):
a trailing ``# comment`` on the field's line (continued on comment-only lines below it), or a ``key: meaning`` clause
of the class docstring (up to the next ``;`` or sentence end outside brackets). Defaults and types are read from the
dataclass fields, so the page cannot drift from the code; the test also fails when a method's key has no meaning.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from engine.config import describe
from engine.run_config import RunConfig
from pruning.methods.base import MethodConfig, registered
from pruning.schedules import list_schedules, schedule_class

PAGE = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
SHARED = ("train", "optim", "lr_schedule", "data")    # sections of the run config shown after the methods


@cache
def _field_comments(cls: type) -> dict[str, str]:
    """Trailing comments of the fields ``cls`` itself declares, by field name."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    out = {}
    for node in getattr(body, "body", []):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = node.end_lineno or node.lineno
            parts = [comments[line]] if line in comments else []
            while parts and line < len(lines) and lines[line].strip().startswith("#"):   # comment-only lines below
                line += 1
                parts.append(comments[line])
            if parts:
                out[node.target.id] = " ".join(parts)
    return out


def _docstring_clause(cls: type, key: str) -> str | None:
    """``key: meaning`` (or ``key X: meaning``) from the class's own docstring, to the next ; or sentence end."""
    doc = " ".join((cls.__dict__.get("__doc__") or "").split())
    match = re.search(rf"(?:^|[;.]\s|:\s)`{{0,2}}{re.escape(key)}`{{0,2}}(?: [^\s:;,.()]+)?: ", doc)
    if match is None:
        return None
    depth, end, text = 0, len(doc), doc[match.end():]
    for i, char in enumerate(text):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if depth == 0 and (char == ";" or (char == "." and (i + 1 == len(text) or text[i + 1] == " "))):
            end = i
            break
    return text[:end].strip() or None


def meaning(cls: type, key: str) -> str | None:
    """A field's meaning by the module's conventions, looked up along the bases (nearest first)."""
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        found = _field_comments(klass).get(key) or _docstring_clause(klass, key)
        if found:
            return found
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _yaml(value: Any) -> str:
    """A default as YAML flow text (nested configs as mappings)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    value = yaml.safe_load(yaml.safe_dump(value, sort_keys=False)) if isinstance(value, (tuple, dict)) else value
    value = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, list) else value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("\n...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str | None]]:
    """(key, default, type, meaning) of every init field of config class ``cls``."""
    hints = get_type_hints(cls)
    return [(f.name, _yaml(_default(f)), describe(hints[f.name]), meaning(cls, f.name))
            for f in dataclasses.fields(cls) if f.init and f.name not in skip]


def _table(cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    out = ["| key | default | type | meaning |", "|---|---|---|---|"]
    for key, default, kind, text in rows(cls, skip):
        out.append(f"| `{key}` | `{_cell(default)}` | {_cell(kind)} | {_cell(text or '')} |")
    return out


def _summary(cls: type) -> str:
    """The first paragraph of a class docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def render() -> str:
    """The whole page."""
    lines = ["# Sparsity methods: every key", "",
             "Generated from the config classes by `python -m scripts.methods_doc`; do not edit by hand "
             "(tests/test_methods_doc.py fails when this page is stale). Every key goes under `sparsity:` in a "
             "config, or on the command line as `sparsity.KEY=VALUE`. `density` is always the fraction of weights "
             "kept, and `scope: layer` always means per-layer budgets. Switching `sparsity.method` on the command "
             "line starts from the new method's defaults and keeps only the keys it shares with the file's method.",
             "", "Methods: " + ", ".join(f"[`{name}`](#{name})" for name, _ in registered()) + ".",
             ""]
    for name, kind in registered():
        lines += [f"## {name}", "", _summary(kind), ""]
        if kind.Config is not MethodConfig:
            lines += [f"Config class `{kind.Config.__name__}`: {_summary(kind.Config)}", ""]
        lines += [*_table(kind.Config, skip=("method",)), ""]
    lines += ["## Shared: sparsity.targets", "", _summary(_targets_class()), "", *_table(_targets_class()), ""]
    lines += ["## Shared: sparsity.schedule (gradual, unit)", "",
              "`name` picks the schedule; the other keys depend on it. Times are steps when integers and fractions "
              "of the run when floats in (0, 1].", ""]
    for name in list_schedules():
        config = schedule_class(name).Config
        lines += [f"### schedule {name}", "", _summary(schedule_class(name)), "", *_table(config), ""]
    hints = get_type_hints(RunConfig)
    for section in SHARED:
        cls = hints[section]
        lines += [f"## Run section: {section}", "", _summary(cls), "", *_table(cls), ""]
    return "\n".join(lines).rstrip() + "\n"


def _targets_class() -> type:
    return get_type_hints(MethodConfig)["targets"]


def missing() -> list[str]:
    """``method.key`` of every method key with no meaning by the conventions (the test wants none)."""
    out = []
    for name, kind in registered():
        out += [f"{name}.{key}" for key, _, _, text in rows(kind.Config, skip=("method",)) if not text]
    out += [f"targets.{key}" for key, _, _, text in rows(_targets_class()) if not text]
    out += [f"schedule {name}.{key}" for name in list_schedules()
            for key, _, _, text in rows(schedule_class(name).Config) if not text]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/methods.md is stale")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != page:
            print(f"{PAGE.name} is stale: run python -m scripts.methods_doc", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

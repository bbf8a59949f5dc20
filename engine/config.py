"""Typed configuration: YAML holds data, dataclasses owned by components hold the types.

The rules, shared by every component:
- A component owns a dataclass config with defaults for every field. Its ``__post_init__`` checks ranges and
  cross-field consistency and raises ``ValueError`` whose message starts with the field name and says the fix.
- This module turns plain data (YAML plus ``a.b.c=value`` overrides) into those dataclasses. It rejects unknown keys
  (listing the valid ones), coerces and checks types from the annotations by the rules data set and model options
  share (``common.coerce``), and prefixes every message with the dotted key, so that a bad input fails in one line
  before any worker starts.
- A config class may define ``config_variant(data) -> type`` to pick a subclass from the data (sparsity methods do:
  ``method: magnitude`` selects the magnitude config).
- A config class may define ``renamed: ClassVar[dict[str, str]]``: an old key (``"final_sparsity"``) or an old value
  (``"scope=local"``) mapped to the fix, so that a config written in an older vocabulary fails naming the new word.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from common import CoercionError, NonFiniteError, coerce, did_you_mean

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the fix."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(tp: Any) -> str:
    """Human words for a type annotation, used in error messages and the generated reference (docs/methods.md)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    if origin in (list, tuple, Sequence):
        inner = args[0] if args else Any
        if get_origin(inner) is Literal:
            return "a list of values from " + ", ".join(repr(a) for a in get_args(inner))
        return f"a list of {describe(inner).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` by the shared rules (common.coerce), nested sections by ``build``."""
    try:
        return coerce(value, tp, key, nested=_section)
    except CoercionError as error:
        raise ConfigError(_wrong_value(error)) from None


def _section(value: Any, cls: type, key: str) -> Any:
    """A nested config section: an absent (null) section takes its defaults."""
    return build(cls, {} if value is None else value, key)


def _wrong_value(error: CoercionError) -> str:
    """The config's wording of a value that does not fit: '<key> must be <words>, got <value>'."""
    if isinstance(error, NonFiniteError):
        return str(error)
    key, tp, value = error.key, error.annotation, error.value
    args = get_args(tp)
    if get_origin(tp) is Literal:
        return f"{key} must be one of {', '.join(repr(a) for a in args)}, got {value!r}{did_you_mean(value, args)}"
    fixed = get_origin(tp) is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)
    if fixed and isinstance(value, (list, tuple)) and len(value) != len(args):
        return f"{key} must be a list of {len(args)} values, got {len(value)}"
    return f"{key} must be {describe(tp)}, got {value!r}"


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from plain data, failing with a one-line ConfigError on any bad key or value."""
    where = path or "the config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    variant = getattr(cls, "config_variant", None)
    if variant is not None:
        try:
            cls = variant(data)
        except ValueError as error:
            raise ConfigError(_prefix(path, str(error), {"method", "name"})) from None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed: Mapping[str, str] = getattr(cls, "renamed", {})
    for key, value in data.items():
        old = str(key) if key not in fields else f"{key}={value}" if isinstance(value, str) else None
        if old in renamed:
            raise ConfigError(f"{_join(path, old)} is no longer accepted: {renamed[old]}")
        if key not in fields:
            raise ConfigError(f"unknown key '{_join(path, str(key))}'{did_you_mean(key, list(fields))}; "
                              f"valid keys{' under ' + path if path else ''}: {', '.join(fields)}")
    kwargs = {k: _coerce(v, hints[k], _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(_prefix(path, str(error), set(fields))) from None


def _prefix(path: str, message: str, fields: set[str]) -> str:
    """'optim.lr must be ...' when the message starts with a field name, else 'optim: message'."""
    if not path:
        return message
    first = message.split(" ", 1)[0]
    return f"{path}.{message}" if first in fields else f"{path}: {message}"


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data for a config (tuples become lists so that YAML stays readable)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=0.05")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override '{item}' has an empty key part; write e.g. optim.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override '{item}': the value is not valid YAML; quote it or fix the brackets") from None
    return [p.strip() for p in parts], value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted override into (a copy of) the nested data; sections are created as needed."""
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        parts, value = parse_override(item)
        set_dotted(result, parts, value, label=f"override '{item}'")
    return result


def set_dotted(data: dict[str, Any], key: str | Sequence[str], value: Any, label: str | None = None) -> None:
    """Put ``value`` at dotted ``key`` (or its parts) of nested plain data, creating sections as needed; a value
    in the way of a section is a ConfigError starting with ``label`` (default: the key)."""
    parts = key.split(".") if isinstance(key, str) else list(key)
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{label or '.'.join(parts)}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping from a local path or any fsspec URL."""
    import fsspec

    try:
        with fsspec.open(path, "r") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass the path of a YAML file, e.g. configs/quickstart.yaml")\
            from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def write_yaml(data: Mapping[str, Any], url: str) -> None:
    """Write a mapping as YAML to a local path or fsspec URL."""
    import fsspec

    with fsspec.open(url, "w") as handle:
        yaml.safe_dump(dict(data), handle, sort_keys=False)

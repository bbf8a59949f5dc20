"""One coercion of untyped values (YAML, ``a.b=value`` overrides, search spaces) to the type annotations of a config.

The engine's config loader, data set options and model options all check values here, so the same input means the
same thing everywhere:

- None, or the text ``null`` / ``none`` (any case), where the annotation allows None;
- bool: a bool, or the text ``true`` / ``false`` (any case); never 0 or 1;
- int: an int, never a bool and never a float (``2.5`` and ``768.0`` alike are reported: a float in a count or a
  width is a slip worth naming); text such as ``"64"`` when ``parse_numbers``;
- float: an int or a float (returned as float), text such as ``"1e-3"`` when ``parse_numbers`` (YAML 1.1 reads
  ``1e-3`` without a dot as a string); never a bool, and never NaN or infinite (``NonFiniteError``): no config
  number of this project means anything at ``.nan`` or ``.inf`` (a learning rate of inf trains to NaN at once, a
  clipping norm of inf is spelled null), so such a value is always a slip and is named before anything starts;
- str: a str only;
- list / Sequence: a list or a tuple, element by element; one string stands for a list of one where strings are
  expected (``data.options.train_shards=s3://bucket/train-{0..9}.tar`` on a command line);
- tuple: a list or a tuple of the declared length (or any length for ``tuple[X, ...]``);
- dict / Mapping: a mapping; keys become strings, values are coerced;
- Literal: an equal value of the same type; Union: None as above, then each member in order, the first that fits.

A value that does not fit raises ``CoercionError`` carrying where (key), what was expected (the annotation at that
point) and what was found, so each component words the message in its own style.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

NULL_TEXT = ("null", "none")
BOOL_TEXT = {"true": True, "false": False}

NestedBuilder = Callable[[Any, type, str], Any]


class CoercionError(ValueError):
    """A value that does not fit its annotation; ``key``, ``annotation`` and ``value`` describe the failing point."""

    def __init__(self, key: str, annotation: Any, value: Any) -> None:
        self.key, self.annotation, self.value = key, annotation, value
        super().__init__(f"{key} must be {type_name(annotation)}, got {value!r}")


class NonFiniteError(CoercionError):
    """A float-typed value that is NaN or infinite: a number, so a Union does not try its other members; the message
    says what is wrong, and the components print it as it is."""

    def __init__(self, key: str, annotation: Any, value: Any) -> None:
        super().__init__(key, annotation, value)
        self.args = (f"{key} must be a finite number, got {value!r}",)


def type_name(annotation: Any) -> str:
    """Short readable name of an annotation for messages: int, list[int], int | None, Literal['a', 'b']."""
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def is_null_text(value: Any) -> bool:
    """True for None and for the words a command line or a search space uses for it."""
    return value is None or (isinstance(value, str) and value.strip().lower() in NULL_TEXT)


def coerce(value: Any, annotation: Any, key: str = "value", *, parse_numbers: bool = True,
           nested: NestedBuilder | None = None) -> Any:
    """``value`` checked against ``annotation`` and converted where the module docstring allows; CoercionError if
    it does not fit. ``nested(value, cls, key)`` builds dataclass-typed values (the config loader's sub-sections)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if is_null_text(value):
            return None
        raise CoercionError(key, annotation, value)
    if dataclasses.is_dataclass(annotation) and nested is not None:
        return nested(value, annotation, key)
    if origin in (Union, types.UnionType):
        return _union(value, annotation, key, parse_numbers, nested)
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise CoercionError(key, annotation, value)
    if annotation in (bool, int, float, str):
        return _scalar(value, annotation, key, parse_numbers)
    if annotation in (list, tuple, dict, Sequence, Mapping) or origin in (list, tuple, dict, Sequence, Mapping):
        return _container(value, annotation, key, parse_numbers, nested)
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise CoercionError(key, annotation, value)
    raise TypeError(f"{key} has an annotation that cannot be checked: {annotation!r}")


def _union(value: Any, annotation: Any, key: str, parse_numbers: bool, nested: NestedBuilder | None) -> Any:
    """None (or null text) where allowed, else the first member that accepts the value."""
    args = get_args(annotation)
    if type(None) in args and is_null_text(value):
        return None
    for member in args:
        if member is type(None):
            continue
        try:
            return coerce(value, member, key, parse_numbers=parse_numbers, nested=nested)
        except NonFiniteError:
            raise
        except CoercionError:
            continue
    raise CoercionError(key, annotation, value)


def _scalar(value: Any, annotation: type, key: str, parse_numbers: bool) -> Any:
    """bool, int, float and str, by the rules of the module docstring."""
    text = isinstance(value, str)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in BOOL_TEXT:
            return BOOL_TEXT[value.strip().lower()]
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text and parse_numbers:
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif text and parse_numbers:
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise NonFiniteError(key, annotation, value)
            return number
    elif text:
        return value
    raise CoercionError(key, annotation, value)


def _container(value: Any, annotation: Any, key: str, parse_numbers: bool, nested: NestedBuilder | None) -> Any:
    """Lists, tuples and mappings, element by element (element keys: key[i] and key.name)."""
    origin, args = get_origin(annotation) or annotation, get_args(annotation)

    def inner(item: Any, tp: Any, where: str) -> Any:
        return coerce(item, tp, where, parse_numbers=parse_numbers, nested=nested)

    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise CoercionError(key, annotation, value)
        tp = args[1] if len(args) == 2 else Any
        return {str(k): inner(v, tp, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CoercionError(key, annotation, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(inner(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise CoercionError(key, annotation, value)
        return tuple(inner(v, tp, f"{key}[{i}]") for i, (v, tp) in enumerate(zip(value, args or [Any] * len(value))))
    tp = args[0] if args else Any
    if isinstance(value, str) and tp is str:
        return [value]
    if not isinstance(value, (list, tuple)):
        raise CoercionError(key, annotation, value)
    return [inner(v, tp, f"{key}[{i}]") for i, v in enumerate(value)]

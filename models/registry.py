"""Model registry: builders are found by name and carry their own typed options.

A builder is `def build(in_channels: int, image_size: int, num_classes: int, *, opt: T = default, ...) -> nn.Module`.
Its keyword-only parameters *are* the model's config: `model_options` reads them from the signature, so a config
loader can check a YAML `model.options` mapping before any worker starts (`check_model_options`) and list the valid
keys when one is wrong.
"""

import copy
import difflib
import inspect
import types
import typing
from typing import Any, Callable, Literal

import torch.nn as nn

from models.common import ModelConfigError

Builder = Callable[..., nn.Module]

_SIZE_ARGS = ("in_channels", "image_size", "num_classes")
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator that records a builder under `name`; names are unique so a typo cannot silently shadow a model."""

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; pick a different name")
        _check_builder_signature(name, builder)
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """All registered model names, sorted, for error messages, docs and registry-wide tests."""
    return sorted(_REGISTRY)


def model_options(name: str) -> dict[str, tuple[Any, Any]]:
    """Option name -> (annotation, default), read from the builder's keyword-only parameters."""
    params = _options_signature(_get_builder(name))
    return {p.name: (p.annotation, copy.deepcopy(p.default)) for p in params}


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Validate option names and basic types without building, so bad configs fail before workers start."""
    valid = model_options(name)
    for key, value in options.items():
        if key not in valid:
            raise ValueError(_unknown_option_message(name, key, sorted(valid)))
        problem = _type_problem(valid[key][0], value, f"option {key}")
        if problem is not None:
            raise ValueError(f"model {name}: {problem}")


def build_model(name: str, *, in_channels: int, image_size: int, num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model; every configuration error surfaces as a one-line ValueError naming the fix."""
    builder = _get_builder(name)
    for arg, value in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {name}: {arg} must be a positive int, got {value!r}")
    check_model_options(name, options)
    try:
        return builder(in_channels, image_size, num_classes, **options)
    except ModelConfigError as err:
        raise ValueError(f"model {name}: {err}") from None


def preset(builder: Builder, **defaults: Any) -> Builder:
    """A builder equal to `builder` with different option defaults, whose signature shows the new defaults.

    Presets (lenet_300_100, wrn28_10, vit_cifar) stay fully configurable, and `model_options` reports what they
    actually build by default.
    """
    sig = inspect.signature(builder, eval_str=True)
    unknown = set(defaults) - {p.name for p in _options_signature(builder)}
    if unknown:
        raise TypeError(f"preset overrides unknown options {sorted(unknown)} of {builder.__name__}")
    params = [p.replace(default=defaults[p.name]) if p.name in defaults else p for p in sig.parameters.values()]

    def build(in_channels: int, image_size: int, num_classes: int, **options: Any) -> nn.Module:
        merged = {**copy.deepcopy(defaults), **options}
        return builder(in_channels, image_size, num_classes, **merged)

    build.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    build.__doc__ = builder.__doc__
    build.__name__ = builder.__name__
    return build


def _get_builder(name: str) -> Builder:
    """Look a name up, suggesting the closest registered name on a typo."""
    if name not in _REGISTRY:
        raise ValueError(_unknown_model_message(name))
    return _REGISTRY[name]


def _unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, list_models(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown model {name!r}; {hint}valid: {', '.join(list_models())}"


def _unknown_option_message(name: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(valid) if valid else "(none)"
    return f"model {name} has no option {key!r}; {hint}valid options: {listed}"


def _options_signature(builder: Builder) -> list[inspect.Parameter]:
    """The keyword-only parameters of a builder, i.e. its options."""
    sig = inspect.signature(builder, eval_str=True)
    return [p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_builder_signature(name: str, builder: Builder) -> None:
    """Reject builders that break the contract at import time, not when a user first picks them."""
    sig = inspect.signature(builder, eval_str=True)
    positional = [p.name for p in sig.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if tuple(positional) != _SIZE_ARGS:
        raise TypeError(f"builder for {name!r} must take (in_channels, image_size, num_classes), got {positional}")
    for p in _options_signature(builder):
        if p.default is inspect.Parameter.empty or p.annotation is inspect.Parameter.empty:
            raise TypeError(f"builder for {name!r}: option {p.name} needs a type annotation and a default")


def _type_name(annotation: Any) -> str:
    """Readable name of an annotation for error messages (int, list[int], 'a' | 'b')."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _type_problem(annotation: Any, value: Any, label: str) -> str | None:
    """None when `value` fits `annotation`, else a sentence about `label` (e.g. 'option depth') saying why not."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value in args and all(type(value) is type(a) for a in args if a == value):
            return None
        choices = ", ".join(repr(a) for a in args)
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{label} must be one of {choices}, got {value!r}{hint}"
    if origin in (typing.Union, types.UnionType):
        if any(_type_problem(a, value, label) is None for a in args):
            return None
        return f"{label} must be {' or '.join(_type_name(a) for a in args)}, got {type(value).__name__}"
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"{label} must be {_type_name(annotation)}, got {type(value).__name__}"
        inner = args[0] if args else Any
        for i, item in enumerate(value):
            problem = _type_problem(inner, item, f"{label}[{i}]")
            if problem is not None:
                return problem
        return None
    if annotation is type(None):
        return None if value is None else f"{label} must be None, got {type(value).__name__}"
    if annotation in (int, float, bool, str):
        return _scalar_problem(annotation, value, label)
    return None  # annotations we cannot check cheaply are left to the builder


def _scalar_problem(annotation: type, value: Any, label: str) -> str | None:
    """bool is not an int here (depth: true is a config bug), but an int is a fine float (dropout: 0)."""
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, annotation)
    return None if ok else f"{label} must be {annotation.__name__}, got {type(value).__name__}"

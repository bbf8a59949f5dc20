"""Model registry: builders are found by name and carry their own typed options.

A builder is `def build(in_channels: int, image_size: int, num_classes: int, *, opt: T = default, ...) -> nn.Module`.
Its keyword-only parameters *are* the model's config: `model_options` reads them from the signature, so a config
loader can check a YAML `model.options` mapping before any worker starts (`check_model_options`) and list the valid
keys when one is wrong.
"""

import copy
import inspect
import types
import typing
from typing import Any, Callable, Literal

import torch.nn as nn

from common import CoercionError, NonFiniteError, Registry, coerce, did_you_mean, type_name
from models.common import ModelConfigError

Builder = Callable[..., nn.Module]

_SIZE_ARGS = ("in_channels", "image_size", "num_classes")
_REGISTRY: Registry[Builder] = Registry("model", unknown="unknown {kind} '{name}'; {hint}valid: {valid}",
                                       hint="did you mean '{}'? ", stamp=None)


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator that records a builder under `name`; names are unique so a typo cannot silently shadow a model."""

    def decorator(builder: Builder) -> Builder:
        if name not in _REGISTRY:   # a duplicate is reported by the registry, before the signature
            _check_builder_signature(name, builder)
        return _REGISTRY.register(name)(builder)

    return decorator


def list_models() -> list[str]:
    """All registered model names, sorted, for error messages, docs and registry-wide tests."""
    return _REGISTRY.names()


def model_options(name: str) -> dict[str, tuple[Any, Any]]:
    """Option name -> (annotation, default), read from the builder's keyword-only parameters."""
    params = _options_signature(_get_builder(name))
    return {p.name: (p.annotation, copy.deepcopy(p.default)) for p in params}


def check_model_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate option names and types without building, so bad configs fail before workers start; returns the
    options converted by the shared rules (common.coerce: 'true' -> True, 'null' -> None, 3 -> 3.0 for a float)."""
    valid = model_options(name)
    checked = {}
    for key, value in options.items():
        if key not in valid:
            raise ValueError(_unknown_option_message(name, key, sorted(valid)))
        try:
            # numbers are not read from text here: a quoted '28' for depth is reported as a str, as the error table
            # of tests/test_models.py expects; booleans, nulls, floats and lists follow the shared rules
            checked[key] = coerce(value, valid[key][0], f"option {key}", parse_numbers=False)
        except CoercionError as error:
            raise ValueError(f"model {name}: {_wrong_option(error)}") from None
    return checked


def build_model(name: str, *, in_channels: int, image_size: int, num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model; every configuration error surfaces as a one-line ValueError naming the fix."""
    builder = _get_builder(name)
    for arg, value in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {name}: {arg} must be a positive int, got {value!r}")
    checked = check_model_options(name, options)
    try:
        return builder(in_channels, image_size, num_classes, **checked)
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
    return _REGISTRY.get(name)


def _unknown_option_message(name: str, key: str, valid: list[str]) -> str:
    hint = did_you_mean(key, valid, "did you mean '{}'? ")
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


def _wrong_option(error: CoercionError) -> str:
    """The model registry's wording: '<option> must be <type>, got <type found>' (a Literal shows the value)."""
    if isinstance(error, NonFiniteError):
        return str(error)
    label, annotation, value = error.key, error.annotation, error.value
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        choices = ", ".join(repr(a) for a in args)
        return f"{label} must be one of {choices}, got {value!r}{did_you_mean(value, args, '; did you mean {!r}?')}"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return f"{label} must be {' or '.join(type_name(a) for a in args)}, got {type(value).__name__}"
    return f"{label} must be {type_name(annotation)}, got {type(value).__name__}"

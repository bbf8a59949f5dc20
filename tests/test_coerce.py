"""The three places that read untyped config values (engine.config.build, data set options, model options) share one
coercion (common.coerce) and therefore agree on booleans, nulls, ints given as floats, and lists."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch.nn as nn

from common import CoercionError, coerce
from engine.config import ConfigError, build
from engine.data import DatasetParts, DatasetSource, parse_options, register_dataset
from engine.data import registry as data_registry
from models import check_model_options, register_model
from models import registry as model_registry


@dataclass
class Probe:
    """One field per rule under test."""

    flag: bool = False
    limit: int | None = 4
    count: int = 1
    ratio: float = 0.5
    names: list[str] = field(default_factory=list)


def probe_model(in_channels: int, image_size: int, num_classes: int, *, flag: bool = False, limit: int | None = 4,
                count: int = 1, ratio: float = 0.5, names: list[str] = ["a"]) -> nn.Module:  # noqa: B006
    """The same options as a model builder."""
    return nn.Identity()


class ProbeSource(DatasetSource):
    """The same options as a data set."""

    Options = Probe

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        raise NotImplementedError


Reader = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture(scope="module")
def readers() -> Iterator[dict[str, Reader]]:
    """Each place, reading a mapping of Probe fields and returning the values it would use."""
    register_dataset("coerce_probe")(ProbeSource)
    register_model("coerce_probe")(probe_model)
    try:
        yield {
            "config": lambda data: {k: getattr(build(Probe, data), k) for k in data},
            "data": lambda data: {k: getattr(parse_options("coerce_probe", data), k) for k in data},
            "model": lambda data: check_model_options("coerce_probe", data),
        }
    finally:
        del data_registry._REGISTRY["coerce_probe"]
        del model_registry._REGISTRY["coerce_probe"]


ACCEPTED = [
    ({"flag": True}, {"flag": True}),
    ({"flag": "true"}, {"flag": True}),
    ({"flag": "False"}, {"flag": False}),
    ({"limit": None}, {"limit": None}),
    ({"limit": "null"}, {"limit": None}),
    ({"limit": "None"}, {"limit": None}),
    ({"limit": 7}, {"limit": 7}),
    ({"count": 3}, {"count": 3}),
    ({"ratio": 2}, {"ratio": 2.0}),
    ({"names": ["x", "y"]}, {"names": ["x", "y"]}),
    ({"names": ("x", "y")}, {"names": ["x", "y"]}),
    ({"names": "x"}, {"names": ["x"]}),
]

REJECTED = [
    {"flag": 1},
    {"flag": "yes please"},
    {"flag": None},
    {"count": 3.0},
    {"count": 2.5},
    {"count": True},
    {"count": "null"},
    {"limit": 4.0},
    {"ratio": True},
    {"names": 3},
    {"names": ["x", 3]},
]


@pytest.mark.parametrize("place", ["config", "data", "model"])
@pytest.mark.parametrize("given, expected", ACCEPTED, ids=[repr(case[0]) for case in ACCEPTED])
def test_places_accept_and_convert_alike(readers: dict[str, Reader], place: str, given: dict, expected: dict) -> None:
    got = readers[place](given)
    assert got == expected
    assert [type(v) for v in got.values()] == [type(v) for v in expected.values()]


@pytest.mark.parametrize("place", ["config", "data", "model"])
@pytest.mark.parametrize("given", REJECTED, ids=[repr(case) for case in REJECTED])
def test_places_reject_alike(readers: dict[str, Reader], place: str, given: dict) -> None:
    key = next(iter(given))
    with pytest.raises(ValueError) as caught:
        readers[place](given)
    assert key in str(caught.value) and "\n" not in str(caught.value)


def test_config_error_type_and_failing_point() -> None:
    with pytest.raises(ConfigError, match=r"^names\[1\] must be a string, got 3$"):
        build(Probe, {"names": ["x", 3]})
    with pytest.raises(CoercionError) as caught:
        coerce({"a": [1, "b"]}, dict[str, list[int]], "opts", parse_numbers=False)
    assert (caught.value.key, caught.value.annotation, caught.value.value) == ("opts.a[1]", int, "b")


def test_numbers_from_text() -> None:
    """Command-line text such as 1e-3 is read as a number where asked; model options keep numbers as numbers."""
    assert coerce("1e-3", float) == 1e-3 and coerce("64", int) == 64
    assert build(Probe, {"ratio": "1e-3", "count": "5"}).ratio == 1e-3
    with pytest.raises(CoercionError):
        coerce("1e-3", float, parse_numbers=False)
    with pytest.raises(CoercionError):
        coerce("2.0", int)
    assert dataclasses.asdict(build(Probe, {}))["limit"] == 4


@pytest.mark.parametrize("place", ["config", "data", "model"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "nan", "-inf", "1e999"])
def test_places_refuse_non_finite_numbers_alike(readers: dict[str, Reader], place: str, value: object) -> None:
    """NaN and infinities are refused in every place with the same words (text only where numbers are parsed)."""
    if place == "model" and isinstance(value, str):
        return      # model options never parse text into numbers: a plain type error there
    with pytest.raises(ValueError) as caught:
        readers[place]({"ratio": value})
    assert str(caught.value).endswith(f"ratio must be a finite number, got {value!r}")


def test_non_finite_is_refused_inside_unions_and_containers() -> None:
    from common import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"^clip must be a finite number, got nan$"):
        coerce(float("nan"), float | None, "clip")
    with pytest.raises(NonFiniteError, match=r"^steps\[1\] must be a finite number, got inf$"):
        coerce([1.0, float("inf")], list[float], "steps")
    assert coerce("null", float | None, "clip") is None and coerce("1e-3", float, "lr") == 0.001

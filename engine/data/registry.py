"""The data set registry: what a source is, how it is registered by name, and how its options are parsed.

A source is a small class registered by name with its own options dataclass, so a config can be checked (name,
options, augmentation, shape, files on disk) before any worker starts. Sources know nothing about processes or ranks:
`engine.data.loaders` turns the `DatasetParts` a source builds into loaders (samplers, validation split, sharding).
"""

from __future__ import annotations

import abc
import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
from torch.utils.data import Dataset

from common import CoercionError, NonFiniteError, Registry, coerce, type_name

AUGMENTS = ("none", "standard", "autoaugment")


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: input shape, classes, and split sizes (global, all ranks)."""

    channels: int
    image_size: int
    num_classes: int
    train_size: int
    test_size: int
    val_size: int = 0


@dataclass(frozen=True)
class DataShape:
    """One sample's channels and side, and the number of classes: what data-free work (SynFlow, layer-collapse
    studies) needs, known without reading the data set."""

    channels: int
    image_size: int
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


@dataclass
class DatasetParts:
    """One data set, read: train with train-time transform, the same train samples with test-time transform (for a
    validation split), the test split, train labels (for stratification) and the spec."""

    train: Dataset
    train_eval: Dataset
    test: Dataset
    train_targets: np.ndarray
    spec: DataSpec


@dataclass
class NoOptions:
    """Options of a data set that has none."""


@dataclass
class GreyOptions:
    """Options of the grey data sets; channels: 3 replicates the grey channel for RGB models."""

    channels: int = 1

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")


class DatasetSource(abc.ABC):
    """Base class of a registered data set; subclasses set the class variables and implement `build`."""

    name: ClassVar[str] = ""  # set by register_dataset
    Options: ClassVar[type] = NoOptions
    augments: ClassVar[tuple[str, ...]] = AUGMENTS  # augmentations this data set supports
    auto_augment: ClassVar[str] = "standard"  # what augment="auto" means here
    downloadable: ClassVar[bool] = False
    streaming: ClassVar[bool] = False  # build() returns IterableDatasets (no sampler, no val split)
    device_stats: ClassVar[tuple | None] = None  # (mean, std) it can leave to the device: then it yields uint8
    native: ClassVar[DataShape | None] = None  # channels, side and classes as stored, for the default shape()

    def __init__(self, root: str, options: Any) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.options = options
        self.uint8_output = False   # set by the loaders for sources with device_stats when normalising on device

    @classmethod
    def shape(cls, options: Any, image_size: int | None) -> DataShape:
        """The samples' shape after resizing to image_size (None: native), without reading the data set. The default
        reads `native`, with channels from the options where they set them; sources whose shape depends on other
        options override this."""
        if cls.native is None:
            raise ValueError(f"the shape of data set {cls.name!r} is not known without reading it; give "
                             f"{cls.__name__} a native shape or a shape() classmethod")
        channels = getattr(options, "channels", cls.native.channels)
        return DataShape(channels, image_size or cls.native.image_size, cls.native.num_classes)

    @classmethod
    def check(cls, options: Any, image_size: int | None) -> None:
        """Cross-checks between options and the common config, run in DataConfig.__post_init__; ValueError if bad."""

    def missing(self) -> str | None:
        """None when the files are present, else a one-line message naming the path, the layout and the fix."""
        return None

    def download(self) -> None:
        """Fetch the files into root; only called when `downloadable` and the user asked for it."""
        raise RuntimeError(f"{type(self).__name__} has no download; place its files under data.root yourself")

    @abc.abstractmethod
    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        """Read the data set; image_size None means native size; augment is already resolved (never 'auto')."""


_REGISTRY: Registry[type[DatasetSource]] = Registry(
    "data set", "name", unknown="{key} '{name}' is not a registered {kind}{hint}; valid: {valid}")


def register_dataset(name: str) -> Callable[[type[DatasetSource]], type[DatasetSource]]:
    """Decorator recording a DatasetSource under `name`; names are unique so a typo cannot shadow a data set."""
    return _REGISTRY.register(name)


def list_datasets() -> list[str]:
    """Registered data set names, sorted, for error messages and registry-wide tests."""
    return _REGISTRY.names()


def get_source(name: str) -> type[DatasetSource]:
    """The source class for `name`, or a ValueError with a did-you-mean and the valid names."""
    return _REGISTRY.get(name)


def parse_options(name: str, options: dict[str, Any]) -> Any:
    """Build the options dataclass of data set `name` by the shared coercion (common.coerce); errors start with
    'options.<key>' and list the valid keys."""
    option_type = get_source(name).Options
    hints = typing.get_type_hints(option_type)
    fields = [f.name for f in dataclasses.fields(option_type)]
    for key in options:
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise ValueError(f"options.{key} is not an option of data set {name!r}; valid options: {valid}")
    try:
        kwargs = {key: coerce(value, hints[key], f"options.{key}") for key, value in options.items()}
    except CoercionError as error:
        raise ValueError(_wrong_option(error)) from None
    try:
        return option_type(**kwargs)
    except ValueError as err:
        raise ValueError(f"options.{err}") from None


def _wrong_option(error: CoercionError) -> str:
    """The data options' wording: 'options.<key> must be of type <type>, got <value>'."""
    if isinstance(error, NonFiniteError):
        return str(error)
    annotation = error.annotation
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (str,):
        expected = "a string or a list of strings"
    else:
        expected = "of type " + type_name(annotation).replace(" | None", " or null")
    return f"{error.key} must be {expected}, got {error.value!r}"


def not_found(name: str, path: str, layout: str, downloadable: bool, parent: str) -> str:
    """The one-line 'data missing' message: what, where, expected layout, and the fix."""
    fix = "set data.download=true to fetch it, or " if downloadable else "download it manually, or "
    return f"{name} data not found at {path} (expected {layout}); {fix}set data.root to the folder that holds {parent}"


def files_layout(kind: str, wanted: Sequence[str], absent: Sequence[str]) -> str:
    """'<kind> a, b, c', naming the missing ones only when some are present (a partial copy)."""
    partial = f"; missing {', '.join(absent)}" if len(absent) < len(wanted) else ""
    return f"{kind} {', '.join(wanted)}{partial}"

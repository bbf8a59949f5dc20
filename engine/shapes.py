"""The shape of a data set without reading it: what data-free work (SynFlow, layer-collapse studies) needs.

A small table of the native sample shape and class count of every file-backed data set, so that a model can be
built and pruned at initialisation for, say, CIFAR-100 on a machine that does not hold CIFAR-100. The in-memory
sets (digits, synthetic) take their shape from their options.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.data import DataConfig
from engine.datasets import parse_options


@dataclass(frozen=True)
class DataShape:
    """One sample's channels and side, and the number of classes."""

    channels: int
    image_size: int
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


# name -> (channels, native image side, classes); grey sets take channels from their options
NATIVE: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 10),
    "mnist": (1, 28, 10),
    "fashion_mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "svhn": (3, 32, 10),
    "tinyimagenet": (3, 64, 200),
    "imagenet": (3, 224, 1000),
}


def data_shape(cfg: DataConfig) -> DataShape:
    """Shape of ``cfg``'s samples after its resizing (``data.image_size``), read from the table or the options."""
    options = parse_options(cfg.name, cfg.options)
    if cfg.name == "synthetic":
        return DataShape(options.channels, options.image_size or cfg.image_size or 32, options.num_classes)
    if cfg.name == "imagenet_shards":   # class count is an option; samples are decoded at data.image_size
        return DataShape(3, cfg.image_size or 224, options.num_classes)
    if cfg.name not in NATIVE:
        raise ValueError(f"the shape of data set {cfg.name!r} is not known without reading it; add it to "
                         "engine.shapes.NATIVE")
    channels, size, classes = NATIVE[cfg.name]
    channels = getattr(options, "channels", channels)
    return DataShape(channels, cfg.image_size or size, classes)

"""Building a run's model from its config and the data's shape, in one place.

``train`` and ``prune`` must see the same network for the same config and seed (a pruning-at-init study is only
meaningful if its model is the one that would be trained), so both build it here. Seeding stays with the caller: the
model is drawn from the torch generator as the caller left it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

import models

if TYPE_CHECKING:
    from engine.run_config import ModelConfig


class SampleShape(Protocol):
    """What a model needs to know of the data: one sample's channels and side, and the number of classes.

    Both the loaders' ``DataSpec`` and the data-free ``engine.data.data_shape`` provide it.
    """

    @property
    def channels(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def num_classes(self) -> int: ...


def build_model(cfg: ModelConfig, shape: SampleShape, device: torch.device | str = "cpu") -> nn.Module:
    """The registered model ``cfg.name`` with its options, sized for ``shape``, on ``device``."""
    model = models.build_model(cfg.name, in_channels=shape.channels, image_size=shape.image_size,
                               num_classes=shape.num_classes, **cfg.options)
    return model.to(device)

"""Data: the data set registry, one module per family of sources, samplers, transforms and the loaders of one rank.

- `registry`: `DatasetSource` (a registered data set that knows its options, files, shape and how to read itself),
  `register_dataset`, option parsing;
- sources: `memory` (digits, synthetic), `torchvision_sets` (mnist, fashion_mnist, cifar10, cifar100, svhn),
  `folders` (tinyimagenet, imagenet), `shards` (imagenet_shards, streamed from tar shards at fsspec URLs);
- `samplers`, `transforms`, and `loaders` (`DataConfig`, `build_loaders`, `check_data_available`, `data_shape`).

Importing this package registers every source, so a name in a config always finds its data set.
"""

from engine.data import folders, memory, shards, torchvision_sets  # noqa: F401  (imported to register the sources)
from engine.data.loaders import DataConfig, Loaders, build_loaders, check_data_available, data_shape
from engine.data.memory import TensorImageDataset
from engine.data.registry import (
    DatasetParts,
    DatasetSource,
    DataShape,
    DataSpec,
    get_source,
    list_datasets,
    parse_options,
    register_dataset,
)
from engine.data.samplers import EpochShuffleSampler, ShardSampler, stratified_split
from engine.data.transforms import DeviceNormalize

__all__ = [
    "DataConfig",
    "DataShape",
    "DataSpec",
    "DatasetParts",
    "DatasetSource",
    "DeviceNormalize",
    "EpochShuffleSampler",
    "Loaders",
    "ShardSampler",
    "TensorImageDataset",
    "build_loaders",
    "check_data_available",
    "data_shape",
    "get_source",
    "list_datasets",
    "parse_options",
    "register_dataset",
    "stratified_split",
]

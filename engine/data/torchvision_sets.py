"""File-backed small-image data sets in torchvision's formats: MNIST, Fashion-MNIST, CIFAR-10/100 and SVHN.

Files are checked before anything reads them, so a bad copy fails in one line in the launcher, before any worker
starts: MNIST's idx headers must match the file sizes; CIFAR batches and SVHN's matlab files must match torchvision's
published md5 sums. CIFAR batches are pickles: they are read by an unpickler that accepts numpy arrays and nothing
else, so even a copy whose check is switched off (``data.options.verify=false``, for a re-packed copy) cannot run
code.
"""

from __future__ import annotations

import codecs
import functools
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.datasets.utils import calculate_md5

from engine.data.registry import (
    DatasetParts,
    DatasetSource,
    DataShape,
    DataSpec,
    GreyOptions,
    files_layout,
    not_found,
    register_dataset,
)
from engine.data.transforms import (
    CIFAR10_STATS,
    CIFAR100_STATS,
    FASHION_STATS,
    MNIST_STATS,
    SVHN_STATS,
    Stats,
    autoaugment_policy,
    small_image_transforms,
)


@functools.lru_cache(maxsize=64)
def _md5(path: str, size: int, mtime_ns: int) -> str:
    """md5 of a file, computed once per (path, size, mtime) in a process (the launcher and the loaders both ask)."""
    return calculate_md5(path)


def md5_mismatches(folder: str, expected: Sequence[tuple[str, str]]) -> list[str]:
    """Names under ``folder`` whose md5 differs from the published one."""
    bad = []
    for name, md5 in expected:
        path = os.path.join(folder, name)
        stat = os.stat(path)
        if _md5(path, stat.st_size, stat.st_mtime_ns) != md5:
            bad.append(name)
    return bad


def _idx_problem(path: str, ndim: int) -> str | None:
    """Why ``path`` is not a complete uint8 idx file of ``ndim`` dimensions, or None."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        header = handle.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or header[:3] != b"\x00\x00\x08" or header[3] != ndim:
        return "no uint8 idx header"
    expected = 4 + 4 * ndim + int(np.prod(struct.unpack(f">{ndim}I", header[4:])))
    return None if size == expected else f"{size} bytes where its header promises {expected}"


@register_dataset("mnist")
class MNIST(DatasetSource):
    """torchvision MNIST from raw idx files in root/MNIST/raw; crop-only augmentation (flips change digits)."""

    Options = GreyOptions
    auto_augment = "none"
    downloadable = True
    native = DataShape(1, 28, 10)
    tv_class: ClassVar[type] = tvd.MNIST
    stats: ClassVar[Stats] = MNIST_STATS
    files: ClassVar[tuple[str, ...]] = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )

    def _raw(self) -> str:
        return os.path.join(self.root, self.tv_class.__name__, "raw")

    def missing(self) -> str | None:
        raw = self._raw()
        absent = [f for f in self.files if not os.path.isfile(os.path.join(raw, f))]
        if not absent:
            for name in self.files:
                problem = _idx_problem(os.path.join(raw, name), 3 if "images" in name else 1)
                if problem:
                    return (f"{os.path.join(raw, name)} is corrupt or truncated ({problem}); delete it and set "
                            "data.download=true, or copy it again")
            return None
        layout = files_layout("uncompressed idx files", self.files, absent)
        return not_found(self.tv_class.__name__, raw, layout, True, f"{self.tv_class.__name__}/raw/")

    def download(self) -> None:
        self.tv_class(self.root, train=True, download=True)

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 28
        rgb = self.options.channels == 3
        train_tf, test_tf = small_image_transforms(
            28, size, self.stats, augment, flip=False, policy=autoaugment_policy(size), to_rgb=rgb
        )
        train = self.tv_class(self.root, train=True, transform=train_tf)
        train_eval = self.tv_class(self.root, train=True, transform=test_tf)
        test = self.tv_class(self.root, train=False, transform=test_tf)
        spec = DataSpec(self.options.channels, size, 10, len(train), len(test))
        return DatasetParts(train, train_eval, test, np.asarray(train.targets), spec)


@register_dataset("fashion_mnist")
class FashionMNIST(MNIST):
    """torchvision FashionMNIST from root/FashionMNIST/raw; same handling as MNIST."""

    tv_class = tvd.FashionMNIST
    stats = FASHION_STATS


class ArrayImageDataset(Dataset):
    """uint8 HWC images in memory (CIFAR-sized), turned into PIL images so torchvision transforms apply."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


@dataclass
class CifarOptions:
    """verify: check torchvision's published md5 of every batch file first; false only for a copy you re-packed
    yourself (it is still read by the numpy-only unpickler)."""

    verify: bool = True


# What a CIFAR batch pickle may name: numpy's array and dtype reconstructors, and bytes from latin-1 text.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _NUMPY_CORE.multiarray.scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _NUMPY_CORE.numeric._frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and numpy arrays, and refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, and only numpy arrays are accepted") from None


def read_cifar_batch(path: str) -> dict[str, Any]:
    """One CIFAR batch file as a dict, read without running code; ValueError in one line when it is not one."""
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise ValueError(f"{path} is not a CIFAR batch ({str(error) or type(error).__name__}); delete it and set "
                         "data.download=true") from None
    if not isinstance(batch, dict) or "data" not in batch:
        raise ValueError(f"{path} is not a CIFAR batch (no 'data' in it); delete it and set data.download=true")
    return batch


@register_dataset("cifar10")
class CIFAR10(DatasetSource):
    """CIFAR-10 python pickles, md5-checked against torchvision's list, then read by a numpy-only unpickler."""

    Options = CifarOptions
    downloadable = True
    native = DataShape(3, 32, 10)
    folder: ClassVar[str] = "cifar-10-batches-py"
    train_files: ClassVar[tuple[str, ...]] = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files: ClassVar[tuple[str, ...]] = ("test_batch",)
    label_key: ClassVar[str] = "labels"
    stats: ClassVar[Stats] = CIFAR10_STATS
    tv_class: ClassVar[type] = tvd.CIFAR10

    def missing(self) -> str | None:
        path = os.path.join(self.root, self.folder)
        wanted = self.train_files + self.test_files
        absent = [f for f in wanted if not os.path.isfile(os.path.join(path, f))]
        if not absent:
            if not self.options.verify:
                return None
            bad = md5_mismatches(path, [(n, m) for n, m in self.tv_class.train_list + self.tv_class.test_list])
            if not bad:
                return None
            return (f"{', '.join(bad)} in {path} do not match torchvision's published md5 (corrupt, altered or "
                    f"re-packed); delete {self.folder} and set data.download=true, or, for a copy you made "
                    "yourself, set data.options.verify=false")
        layout = files_layout("python pickles", wanted, absent)
        return not_found(type(self).__name__, path, layout, True, f"{self.folder}/")

    def download(self) -> None:
        self.tv_class(self.root, train=True, download=True)

    def _read(self, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate batches into (N, 32, 32, 3) uint8 images and int64 labels."""
        images, labels = [], []
        for name in files:
            batch = read_cifar_batch(os.path.join(self.root, self.folder, name))
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[self.label_key], dtype=np.int64))
        return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 32
        train_tf, test_tf = small_image_transforms(
            32, size, self.stats, augment, flip=True, policy=autoaugment_policy(size)
        )
        train_x, train_y = self._read(self.train_files)
        test_x, test_y = self._read(self.test_files)
        spec = DataSpec(3, size, self.native.num_classes, len(train_y), len(test_y))
        return DatasetParts(
            train=ArrayImageDataset(train_x, train_y, train_tf),
            train_eval=ArrayImageDataset(train_x, train_y, test_tf),
            test=ArrayImageDataset(test_x, test_y, test_tf),
            train_targets=train_y,
            spec=spec,
        )


@register_dataset("cifar100")
class CIFAR100(CIFAR10):
    """CIFAR-100 (fine labels) from root/cifar-100-python/{train,test}."""

    native = DataShape(3, 32, 100)
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    stats = CIFAR100_STATS
    tv_class = tvd.CIFAR100


@register_dataset("svhn")
class SVHN(DatasetSource):
    """torchvision SVHN (train split) from root/{train,test}_32x32.mat; crop-only augmentation, SVHN AutoAugment."""

    downloadable = True
    native = DataShape(3, 32, 10)
    files: ClassVar[tuple[str, ...]] = ("train_32x32.mat", "test_32x32.mat")

    def missing(self) -> str | None:
        absent = [f for f in self.files if not os.path.isfile(os.path.join(self.root, f))]
        if not absent:   # torchvision's SVHN refuses a file off its md5 anyway: say so here, in one line
            bad = md5_mismatches(self.root, [tvd.SVHN.split_list[split][1:] for split in ("train", "test")])
            if not bad:
                return None
            return (f"{', '.join(bad)} in {self.root} do not match torchvision's published md5 (corrupt or "
                    "altered); delete them and set data.download=true")
        layout = files_layout("matlab files", self.files, absent)
        return not_found("SVHN", self.root, layout, True, "train_32x32.mat and test_32x32.mat")

    def download(self) -> None:
        for split in ("train", "test"):
            tvd.SVHN(self.root, split=split, download=True)

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 32
        train_tf, test_tf = small_image_transforms(
            32, size, SVHN_STATS, augment, flip=False, policy=T.AutoAugmentPolicy.SVHN
        )
        train = tvd.SVHN(self.root, split="train", transform=train_tf)
        train_eval = tvd.SVHN(self.root, split="train", transform=test_tf)
        test = tvd.SVHN(self.root, split="test", transform=test_tf)
        spec = DataSpec(3, size, 10, len(train), len(test))
        return DatasetParts(train, train_eval, test, np.asarray(train.labels), spec)

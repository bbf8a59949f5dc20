"""Image-folder data sets: Tiny ImageNet (official layout) and ImageNet (ImageFolder layout), read file by file."""

from __future__ import annotations

import os
from typing import Callable, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

from engine.data.registry import DatasetParts, DatasetSource, DataShape, DataSpec, not_found, register_dataset
from engine.data.transforms import (
    IMAGENET_STATS,
    TINY_STATS,
    autoaugment_policy,
    imagenet_transforms,
    small_image_transforms,
)


class ImageListDataset(Dataset):
    """(path, label) pairs loaded as RGB PIL images (some ImageNet-family JPEGs are greyscale or CMYK)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(default_loader(path)), label


def class_dirs(path: str) -> list[str]:
    """Sorted sub-folder names: class names in ImageFolder layouts."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir()) if os.path.isdir(path) else []


def images_in(path: str) -> list[str]:
    """Sorted image files directly in `path`."""
    return sorted(
        os.path.join(path, e.name) for e in os.scandir(path) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
    )


def folder_samples(split_dir: str, class_to_idx: dict[str, int], nested: str = "") -> list[tuple[str, int]]:
    """Images of `split_dir/<class>/<nested>/` (or `split_dir/<class>/` when nested is absent) with labels."""
    samples = []
    for wnid, label in class_to_idx.items():
        folder = os.path.join(split_dir, wnid)
        if nested and os.path.isdir(os.path.join(folder, nested)):
            folder = os.path.join(folder, nested)
        if os.path.isdir(folder):
            samples += [(p, label) for p in images_in(folder)]
    return samples


@register_dataset("tinyimagenet")
class TinyImageNet(DatasetSource):
    """Tiny ImageNet (200 classes, 64 px) in the official layout; its val split serves as the test set."""

    downloadable = True
    native = DataShape(3, 64, 200)
    url: ClassVar[str] = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    layout: ClassVar[str] = (
        "train/<wnid>/images/*.JPEG and val/images/*.JPEG with val/val_annotations.txt (or val/<wnid>/)"
    )

    def _base(self) -> str:
        return os.path.join(self.root, "tiny-imagenet-200")

    def missing(self) -> str | None:
        base = self._base()
        val = os.path.join(base, "val")
        has_val = os.path.isfile(os.path.join(val, "val_annotations.txt")) or bool(class_dirs(val))
        if class_dirs(os.path.join(base, "train")) and has_val:
            return None
        return not_found("TinyImageNet", base, self.layout, True, "tiny-imagenet-200/")

    def download(self) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(self.url, download_root=self.root)

    def _val_samples(self, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
        """Official flat val folder labelled by val_annotations.txt, else val/<wnid>/ folders."""
        val = os.path.join(self._base(), "val")
        notes = os.path.join(val, "val_annotations.txt")
        if not os.path.isfile(notes):
            return folder_samples(val, class_to_idx, nested="images")
        samples = []
        with open(notes) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1].strip() in class_to_idx:
                    samples.append((os.path.join(val, "images", parts[0].strip()), class_to_idx[parts[1].strip()]))
        return samples

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 64
        train_tf, test_tf = small_image_transforms(
            64, size, TINY_STATS, augment, flip=True, policy=autoaugment_policy(size)
        )
        wnids = class_dirs(os.path.join(self._base(), "train"))
        class_to_idx = {w: i for i, w in enumerate(wnids)}
        train = folder_samples(os.path.join(self._base(), "train"), class_to_idx, nested="images")
        test = self._val_samples(class_to_idx)
        targets = np.array([label for _, label in train], dtype=np.int64)
        spec = DataSpec(3, size, len(wnids), len(train), len(test))
        return DatasetParts(
            ImageListDataset(train, train_tf), ImageListDataset(train, test_tf), ImageListDataset(test, test_tf),
            targets, spec,
        )


@register_dataset("imagenet")
class ImageNet(DatasetSource):
    """ImageNet in ImageFolder layout (root/imagenet/{train,val}/<class>/, or root/{train,val}/<class>/)."""

    device_stats = IMAGENET_STATS
    native = DataShape(3, 224, 1000)

    def _base(self) -> str:
        nested = os.path.join(self.root, "imagenet")
        return nested if os.path.isdir(os.path.join(nested, "train")) else self.root

    def missing(self) -> str | None:
        base = self._base()
        if class_dirs(os.path.join(base, "train")) and class_dirs(os.path.join(base, "val")):
            return None
        return not_found(
            "ImageNet", os.path.join(self.root, "imagenet"),
            "train/<class>/*.JPEG and val/<class>/*.JPEG, val sorted into class folders", False,
            "imagenet/ (or train/ and val/ directly)",
        )

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 224
        train_tf, test_tf = imagenet_transforms(size, augment, self.uint8_output)
        classes = class_dirs(os.path.join(self._base(), "train"))
        class_to_idx = {c: i for i, c in enumerate(classes)}
        train = make_dataset(os.path.join(self._base(), "train"), class_to_idx, extensions=IMG_EXTENSIONS)
        test = make_dataset(
            os.path.join(self._base(), "val"), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
        )
        targets = np.array([label for _, label in train], dtype=np.int64)
        spec = DataSpec(3, size, len(classes), len(train), len(test))
        return DatasetParts(
            ImageListDataset(train, train_tf), ImageListDataset(train, test_tf), ImageListDataset(test, test_tf),
            targets, spec,
        )

"""In-memory data sets: scikit-learn's 8x8 digits (the default: no files, no download) and generated synthetic data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T

from engine.data.registry import DatasetParts, DatasetSource, DataShape, DataSpec, GreyOptions, register_dataset


class TensorImageDataset(Dataset):
    """Images and labels held as tensors, with an optional per-sample tensor transform (augmentation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.labels[index]


@register_dataset("digits")
class Digits(DatasetSource):
    """scikit-learn's bundled 8x8 digits: the default, no download; a fixed split so the test set never changes."""

    Options = GreyOptions
    augments = ("none", "standard")
    auto_augment = "none"
    native = DataShape(1, 8, 10)
    split_seed: ClassVar[int] = 0
    test_size: ClassVar[int] = 360

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(bunch.target, dtype=torch.int64)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=self.test_size, stratify=bunch.target, random_state=self.split_seed
        )
        size = image_size or 8
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        train_x, test_x = images[train_idx], images[test_idx]
        mean, std = train_x.mean(), train_x.std()
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        if self.options.channels == 3:
            train_x, test_x = train_x.repeat(1, 3, 1, 1), test_x.repeat(1, 3, 1, 1)
        train_y, test_y = labels[train_idx], labels[test_idx]
        transform = None
        if augment == "standard":  # crop only: flips change digits; pad with the normalised background value
            transform = T.RandomCrop(size, padding=max(1, size // 8), fill=float(-mean / std))
        spec = DataSpec(self.options.channels, size, 10, len(train_y), len(test_y))
        return DatasetParts(
            train=TensorImageDataset(train_x, train_y, transform),
            train_eval=TensorImageDataset(train_x, train_y),
            test=TensorImageDataset(test_x, test_y),
            train_targets=train_y.numpy(),
            spec=spec,
        )


@dataclass
class SyntheticOptions:
    """Shape and size of the generated problem; seed fixes the data independently of the run seed."""

    channels: int = 3
    image_size: int | None = None  # None -> data.image_size, else 32
    num_classes: int = 10
    train_size: int = 1024
    test_size: int = 256
    noise: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("channels", "num_classes", "train_size", "test_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


@register_dataset("synthetic")
class Synthetic(DatasetSource):
    """Smooth Gaussian class prototypes plus pixel noise: learnable, generated in milliseconds, for benchmarks."""

    Options = SyntheticOptions
    augments = ("none",)
    auto_augment = "none"

    @classmethod
    def shape(cls, options: Any, image_size: int | None) -> DataShape:
        """Everything comes from the options; the side from options.image_size, else image_size, else 32."""
        return DataShape(options.channels, options.image_size or image_size or 32, options.num_classes)

    @classmethod
    def check(cls, options: Any, image_size: int | None) -> None:
        """The generated size comes from options.image_size or image_size; two different values are a mistake."""
        if options.image_size is not None and image_size is not None and options.image_size != image_size:
            raise ValueError(
                f"options.image_size ({options.image_size}) conflicts with image_size ({image_size}); set only one"
            )

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        opt = self.options
        size = opt.image_size or image_size or 32
        gen = torch.Generator().manual_seed(opt.seed)
        coarse = torch.randn(opt.num_classes, opt.channels, max(1, size // 4), max(1, size // 4), generator=gen)
        protos = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        flat = protos.flatten(1)
        protos = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)).view_as(protos)
        train = self._sample(protos, opt.train_size, opt.seed + 1)
        test = self._sample(protos, opt.test_size, opt.seed + 2)
        spec = DataSpec(opt.channels, size, opt.num_classes, opt.train_size, opt.test_size)
        return DatasetParts(train, train, test, train.labels.numpy(), spec)

    def _sample(self, protos: torch.Tensor, count: int, seed: int) -> TensorImageDataset:
        """Balanced labels in random order; each sample is its prototype plus noise, scaled to unit variance."""
        gen = torch.Generator().manual_seed(seed)
        labels = (torch.arange(count) % len(protos))[torch.randperm(count, generator=gen)]
        noise = torch.randn(count, *protos.shape[1:], generator=gen) * self.options.noise
        images = (protos[labels] + noise) / (1.0 + self.options.noise**2) ** 0.5
        return TensorImageDataset(images, labels)

"""Image pipelines and per-data-set statistics: PIL transforms in the loader workers, normalisation on the device."""

from __future__ import annotations

from typing import Callable

import torch
from torchvision import transforms as T

Stats = tuple[tuple[float, ...], tuple[float, ...]]

MNIST_STATS: Stats = ((0.1307,), (0.3081,))
FASHION_STATS: Stats = ((0.2860,), (0.3530,))
CIFAR10_STATS: Stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS: Stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS: Stats = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
TINY_STATS: Stats = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def small_image_transforms(
    native: int,
    size: int,
    stats: Stats,
    augment: str,
    *,
    flip: bool,
    policy: T.AutoAugmentPolicy,
    to_rgb: bool = False,
) -> tuple[Callable, Callable]:
    """(train, test) PIL pipelines for 28-64 px data sets: optional resize, crop(+flip)(+AutoAugment), normalise."""
    prefix: list[Callable] = [T.Resize(size)] if size != native else []
    if to_rgb:
        prefix.append(T.Grayscale(num_output_channels=3))
    mean, std = stats
    if to_rgb and len(mean) == 1:
        mean, std = mean * 3, std * 3
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    aug: list[Callable] = []
    if augment in ("standard", "autoaugment"):
        aug.append(T.RandomCrop(size, padding=4))
        if flip:
            aug.append(T.RandomHorizontalFlip())
    if augment == "autoaugment":
        aug.append(T.AutoAugment(policy))
    return T.Compose(prefix + aug + tail), T.Compose(prefix + tail)


def imagenet_transforms(size: int, augment: str, uint8: bool = False) -> tuple[Callable, Callable]:
    """(train, test) pipelines in the usual ImageNet recipe: random-resized crop for training, resize+centre crop.

    uint8=True ends in uint8 CHW tensors, leaving conversion and normalisation to the device (a quarter of the
    bytes through pinned memory and the host-to-device copy, and no float work in the loader workers)."""
    norm = [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(IMAGENET_STATS[0], IMAGENET_STATS[1])]
    test = T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)] + norm)
    if augment == "none":
        return test, test
    aug: list[Callable] = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    if augment == "autoaugment":
        aug.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    return T.Compose(aug + norm), test


def autoaugment_policy(size: int) -> T.AutoAugmentPolicy:
    """CIFAR10's AutoAugment policy for small images, ImageNet's for larger ones."""
    return T.AutoAugmentPolicy.CIFAR10 if size <= 32 else T.AutoAugmentPolicy.IMAGENET


class DeviceNormalize:
    """uint8 images -> float32 (x / 255 - mean) / std on the device of the batch, as one subtract and one multiply."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.shift.device != images.device:
            self.shift, self.scale = self.shift.to(images.device), self.scale.to(images.device)
        return (images.float() - self.shift).mul_(self.scale)

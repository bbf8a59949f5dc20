"""Data set registry and sources: where each data set lives on disk, how to read it, what it looks like.

`engine.data` turns a source's `DatasetParts` into loaders (samplers, validation split, sharding); this module knows
nothing about processes or ranks. A source is a small class registered by name with its own options dataclass, so a
config can be checked (name, options, augmentation, files on disk) before any worker starts.
"""

import abc
import dataclasses
import difflib
import os
import pickle
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

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


class DatasetSource(abc.ABC):
    """Base class of a registered data set; subclasses set the class variables and implement `build`."""

    Options: ClassVar[type] = NoOptions
    augments: ClassVar[tuple[str, ...]] = AUGMENTS  # augmentations this data set supports
    auto_augment: ClassVar[str] = "standard"  # what augment="auto" means here
    downloadable: ClassVar[bool] = False
    streaming: ClassVar[bool] = False  # build() returns IterableDatasets (no sampler, no val split)
    device_stats: ClassVar[tuple | None] = None  # (mean, std) it can leave to the device: then it yields uint8


    def __init__(self, root: str, options: Any) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.options = options
        self.uint8_output = False   # set by engine.data for sources with device_stats when normalising on device

    def missing(self) -> str | None:
        """None when the files are present, else a one-line message naming the path, the layout and the fix."""
        return None

    def download(self) -> None:
        """Fetch the files into root; only called when `downloadable` and the user asked for it."""
        raise RuntimeError(f"{type(self).__name__} has no download; place its files under data.root yourself")

    @classmethod
    def check(cls, options: Any, image_size: int | None) -> None:
        """Cross-checks between options and the common config, run in DataConfig.__post_init__; ValueError if bad."""

    @abc.abstractmethod
    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        """Read the data set; image_size None means native size; augment is already resolved (never 'auto')."""


_REGISTRY: dict[str, type[DatasetSource]] = {}


def register_dataset(name: str) -> Callable[[type[DatasetSource]], type[DatasetSource]]:
    """Decorator recording a DatasetSource under `name`; names are unique so a typo cannot shadow a data set."""

    def decorator(source: type[DatasetSource]) -> type[DatasetSource]:
        if name in _REGISTRY:
            raise ValueError(f"data set {name!r} is already registered (by {_REGISTRY[name].__name__})")
        _REGISTRY[name] = source
        return source

    return decorator


def list_datasets() -> list[str]:
    """Registered data set names, sorted, for error messages and registry-wide tests."""
    return sorted(_REGISTRY)


def get_source(name: str) -> type[DatasetSource]:
    """The source class for `name`, or a ValueError with a did-you-mean and the valid names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"name {name!r} is not a registered data set{hint}; valid: {', '.join(list_datasets())}")
    return _REGISTRY[name]


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Coerce one option value to its declared type (options arrive untyped from YAML or dotted overrides)."""
    args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]: None (or "null") passes, anything else is coerced to X
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is list:  # a list of strings; one string is a list of one
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"{key} must be a string or a list of strings, got {value!r}")
        return list(items)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be of type {kind.__name__}, got {value!r}") from None


def parse_options(name: str, options: dict[str, Any]) -> Any:
    """Build the options dataclass of data set `name`; errors start with 'options.<key>' and list valid keys."""
    option_type = get_source(name).Options
    fields = {f.name: f for f in dataclasses.fields(option_type)}
    valid = ", ".join(fields) or "none"
    for key in options:
        if key not in fields:
            raise ValueError(f"options.{key} is not an option of data set {name!r}; valid options: {valid}")
    kwargs = {key: _coerce(f"options.{key}", value, fields[key].type) for key, value in options.items()}
    try:
        return option_type(**kwargs)
    except ValueError as err:
        raise ValueError(f"options.{err}") from None


# ----------------------------------------------------------------------------------------------------------------
# In-memory tensor data sets: digits, synthetic


class TensorImageDataset(Dataset):
    """Images and labels held as tensors, with an optional per-sample tensor transform (augmentation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.labels[index]


@dataclass
class GreyOptions:
    """channels: 3 replicates the grey channel for RGB models."""

    channels: int = 1

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")


@register_dataset("digits")
class Digits(DatasetSource):
    """scikit-learn's bundled 8x8 digits: the default, no download; a fixed split so the test set never changes."""

    Options = GreyOptions
    augments = ("none", "standard")
    auto_augment = "none"
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


# ----------------------------------------------------------------------------------------------------------------
# Image transforms for the file-backed data sets


def small_image_transforms(
    native: int,
    size: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
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


def _policy(size: int) -> T.AutoAugmentPolicy:
    """CIFAR10's AutoAugment policy for small images, ImageNet's for larger ones."""
    return T.AutoAugmentPolicy.CIFAR10 if size <= 32 else T.AutoAugmentPolicy.IMAGENET


MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
TINY_STATS = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def not_found(name: str, path: str, layout: str, downloadable: bool, parent: str) -> str:
    """The one-line 'data missing' message: what, where, expected layout, and the fix."""
    fix = "set data.download=true to fetch it, or " if downloadable else "download it manually, or "
    return f"{name} data not found at {path} (expected {layout}); {fix}set data.root to the folder that holds {parent}"


# ----------------------------------------------------------------------------------------------------------------
# File-backed data sets: MNIST family, CIFAR, SVHN


def _files_layout(kind: str, wanted: Sequence[str], absent: Sequence[str]) -> str:
    """'<kind> a, b, c', naming the missing ones only when some are present (a partial copy)."""
    partial = f"; missing {', '.join(absent)}" if len(absent) < len(wanted) else ""
    return f"{kind} {', '.join(wanted)}{partial}"


@register_dataset("mnist")
class MNIST(DatasetSource):
    """torchvision MNIST from raw idx files in root/MNIST/raw; crop-only augmentation (flips change digits)."""

    Options = GreyOptions
    auto_augment = "none"
    downloadable = True
    tv_class: ClassVar[type] = tvd.MNIST
    stats: ClassVar[tuple] = MNIST_STATS
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
            return None
        layout = _files_layout("uncompressed idx files", self.files, absent)
        return not_found(self.tv_class.__name__, raw, layout, True, f"{self.tv_class.__name__}/raw/")

    def download(self) -> None:
        self.tv_class(self.root, train=True, download=True)

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 28
        rgb = self.options.channels == 3
        train_tf, test_tf = small_image_transforms(
            28, size, self.stats, augment, flip=False, policy=_policy(size), to_rgb=rgb
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


@register_dataset("cifar10")
class CIFAR10(DatasetSource):
    """CIFAR-10 python pickles read directly (torchvision's md5 checks would reject re-packed or test copies)."""

    downloadable = True
    folder: ClassVar[str] = "cifar-10-batches-py"
    train_files: ClassVar[tuple[str, ...]] = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files: ClassVar[tuple[str, ...]] = ("test_batch",)
    label_key: ClassVar[str] = "labels"
    num_classes: ClassVar[int] = 10
    stats: ClassVar[tuple] = CIFAR10_STATS
    tv_class: ClassVar[type] = tvd.CIFAR10

    def missing(self) -> str | None:
        path = os.path.join(self.root, self.folder)
        wanted = self.train_files + self.test_files
        absent = [f for f in wanted if not os.path.isfile(os.path.join(path, f))]
        if not absent:
            return None
        layout = _files_layout("python pickles", wanted, absent)
        return not_found(type(self).__name__, path, layout, True, f"{self.folder}/")

    def download(self) -> None:
        self.tv_class(self.root, train=True, download=True)

    def _read(self, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate batches into (N, 32, 32, 3) uint8 images and int64 labels."""
        images, labels = [], []
        for name in files:
            with open(os.path.join(self.root, self.folder, name), "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[self.label_key], dtype=np.int64))
        return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 32
        train_tf, test_tf = small_image_transforms(32, size, self.stats, augment, flip=True, policy=_policy(size))
        train_x, train_y = self._read(self.train_files)
        test_x, test_y = self._read(self.test_files)
        spec = DataSpec(3, size, self.num_classes, len(train_y), len(test_y))
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

    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    num_classes = 100
    stats = CIFAR100_STATS
    tv_class = tvd.CIFAR100


@register_dataset("svhn")
class SVHN(DatasetSource):
    """torchvision SVHN (train split) from root/{train,test}_32x32.mat; crop-only augmentation, SVHN AutoAugment."""

    downloadable = True
    files: ClassVar[tuple[str, ...]] = ("train_32x32.mat", "test_32x32.mat")

    def missing(self) -> str | None:
        absent = [f for f in self.files if not os.path.isfile(os.path.join(self.root, f))]
        if not absent:
            return None
        layout = _files_layout("matlab files", self.files, absent)
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


# ----------------------------------------------------------------------------------------------------------------
# Image folders: Tiny ImageNet, ImageNet


class ImageListDataset(Dataset):
    """(path, label) pairs loaded as RGB PIL images (some ImageNet-family JPEGs are greyscale or CMYK)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(default_loader(path)), label


def _class_dirs(path: str) -> list[str]:
    """Sorted sub-folder names: class names in ImageFolder layouts."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir()) if os.path.isdir(path) else []


def _images_in(path: str) -> list[str]:
    """Sorted image files directly in `path`."""
    return sorted(
        os.path.join(path, e.name) for e in os.scandir(path) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
    )


def _folder_samples(split_dir: str, class_to_idx: dict[str, int], nested: str = "") -> list[tuple[str, int]]:
    """Images of `split_dir/<class>/<nested>/` (or `split_dir/<class>/` when nested is absent) with labels."""
    samples = []
    for wnid, label in class_to_idx.items():
        folder = os.path.join(split_dir, wnid)
        if nested and os.path.isdir(os.path.join(folder, nested)):
            folder = os.path.join(folder, nested)
        if os.path.isdir(folder):
            samples += [(p, label) for p in _images_in(folder)]
    return samples


@register_dataset("tinyimagenet")
class TinyImageNet(DatasetSource):
    """Tiny ImageNet (200 classes, 64 px) in the official layout; its val split serves as the test set."""

    downloadable = True
    url: ClassVar[str] = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    layout: ClassVar[str] = (
        "train/<wnid>/images/*.JPEG and val/images/*.JPEG with val/val_annotations.txt (or val/<wnid>/)"
    )

    def _base(self) -> str:
        return os.path.join(self.root, "tiny-imagenet-200")

    def missing(self) -> str | None:
        base = self._base()
        val = os.path.join(base, "val")
        has_val = os.path.isfile(os.path.join(val, "val_annotations.txt")) or bool(_class_dirs(val))
        if _class_dirs(os.path.join(base, "train")) and has_val:
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
            return _folder_samples(val, class_to_idx, nested="images")
        samples = []
        with open(notes) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1].strip() in class_to_idx:
                    samples.append((os.path.join(val, "images", parts[0].strip()), class_to_idx[parts[1].strip()]))
        return samples

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 64
        train_tf, test_tf = small_image_transforms(64, size, TINY_STATS, augment, flip=True, policy=_policy(size))
        wnids = _class_dirs(os.path.join(self._base(), "train"))
        class_to_idx = {w: i for i, w in enumerate(wnids)}
        train = _folder_samples(os.path.join(self._base(), "train"), class_to_idx, nested="images")
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

    def _base(self) -> str:
        nested = os.path.join(self.root, "imagenet")
        return nested if os.path.isdir(os.path.join(nested, "train")) else self.root

    def missing(self) -> str | None:
        base = self._base()
        if _class_dirs(os.path.join(base, "train")) and _class_dirs(os.path.join(base, "val")):
            return None
        return not_found(
            "ImageNet", os.path.join(self.root, "imagenet"),
            "train/<class>/*.JPEG and val/<class>/*.JPEG, val sorted into class folders", False,
            "imagenet/ (or train/ and val/ directly)",
        )

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 224
        train_tf, test_tf = imagenet_transforms(size, augment, self.uint8_output)
        classes = _class_dirs(os.path.join(self._base(), "train"))
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

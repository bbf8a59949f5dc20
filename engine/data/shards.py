"""Streaming ImageNet from tar shards at any fsspec URL (local, memory://, s3://, gs://, ...).

Object storage serves large sequential reads well and millions of small files badly, so ImageNet is packed into tar
shards (the WebDataset layout): a sample is the run of consecutive members sharing a key (the file name up to its
first dot), e.g. ``n01440764_10026.jpg`` + ``n01440764_10026.cls`` holding the integer label.

Splitting: every epoch the shard list is shuffled with a generator seeded by (seed, epoch), identically on every
rank, and reader g = rank * num_workers + worker takes shards g, g + G, ... (G = world_size * num_workers), so the
readers' shards are disjoint and cover the list. Samples pass through a small shuffle buffer seeded by (seed, epoch,
reader). Training streams have a fixed length, declared by a sample count option (the trainer sizes the epoch and the
LR schedule from ``len(loader)``, and DDP needs every rank to take the same number of steps): each reader yields a
whole number of batches, its share of ``train_samples // world_size``; a reader whose shards run out first starts
another pass over them, one with more stops early. With equal shards that divide evenly, each sample is read exactly
once per epoch. Evaluation streams have no quota: every sample of every shard once, no shuffle, ranks possibly
unequal (metrics are summed over ranks, as for the map-style test sets).
"""

from __future__ import annotations

import io
import itertools
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from engine.data.registry import DatasetParts, DatasetSource, DataShape, DataSpec, register_dataset
from engine.data.transforms import IMAGENET_STATS, imagenet_transforms

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_shards(patterns: list[str]) -> list[str]:
    """Expand brace patterns: ``{000..009}`` (zero-padded ranges, width from the first bound) and ``{a,b}`` lists."""
    out: list[str] = []
    for pattern in patterns:
        match = _BRACES.search(pattern)
        if match is None:
            out.append(pattern)
            continue
        rng = _RANGE.fullmatch(match.group(0))
        if rng:
            lo, hi = int(rng.group(1)), int(rng.group(2))
            if hi < lo:
                raise ValueError(f"shard range {match.group(0)} in {pattern!r} is empty; write {{low..high}}")
            width = len(rng.group(1))
            choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
        else:
            choices = match.group(1).split(",")
        head, tail = pattern[: match.start()], pattern[match.end():]
        out += expand_shards([head + c + tail for c in choices])
    return out


def resolve_shards(patterns: list[str], root: str) -> list[str]:
    """Expanded shard URLs; paths without a protocol are relative to data.root (absolute ones stay as written)."""
    urls = []
    for url in expand_shards(patterns):
        if "://" not in url and not os.path.isabs(url):
            url = os.path.join(root, url)
        urls.append(url)
    return urls


def missing_shards(urls: list[str]) -> str | None:
    """None when every shard exists, else the first missing URL; one listing per folder, not one request per shard."""
    listed: dict[str, set[str]] = {}
    for url in urls:
        folder = url.rsplit("/", 1)[0]
        if folder not in listed:
            try:
                fs, path = fsspec.core.url_to_fs(folder)
                listed[folder] = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
            except (FileNotFoundError, NotADirectoryError):
                listed[folder] = set()
        if url.rsplit("/", 1)[-1] not in listed[folder]:
            return url
    return None


def iter_tar_samples(url: str) -> Iterator[dict[str, bytes]]:
    """Samples of one shard, read as a stream (no seeking, so any fsspec file works): {'__key__', ext: bytes}."""
    with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        sample: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            if base.startswith("."):
                continue
            key, _, ext = base.partition(".")
            key = f"{folder}/{key}" if folder else key
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            handle = tar.extractfile(member)
            sample[ext.lower()] = handle.read() if handle else b""
        if sample:
            yield sample


def decode_sample(sample: dict[str, bytes], url: str) -> tuple[Image.Image, int]:
    """(RGB image, label) from one sample's image and .cls members; a malformed sample names its shard and key."""
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None or "cls" not in sample:
        raise ValueError(f"sample {sample['__key__']!r} in {url} lacks an image ({'/'.join(IMAGE_EXTS)}) or a .cls "
                         f"label; members: {sorted(k for k in sample if k != '__key__')}")
    return Image.open(io.BytesIO(image)).convert("RGB"), int(sample["cls"].decode().strip())


class TarShardDataset(IterableDataset):
    """Decoded (image, label) pairs streamed from tar shards; see the module docstring for the split and length."""

    def __init__(self, urls: list[str], transform: Callable, *, samples: int, train: bool,
                 shuffle_buffer: int = 0) -> None:
        self.urls, self.transform, self.samples, self.train = urls, transform, samples, train
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.rank, self.world_size, self.batch_size, self.num_workers = 0, 0, 1, 1, 0
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # persistent workers see set_epoch

    def configure(self, *, seed: int, rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
        """Called once by the loader builder: which rank this is and how the stream is cut into batches."""
        readers = world_size * max(1, num_workers)
        if len(self.urls) < readers:
            raise ValueError(f"{len(self.urls)} shards cannot feed {readers} readers (world_size {world_size} x "
                             f"{max(1, num_workers)} workers); use more shards or lower data.num_workers")
        if self.train and self.samples // world_size < batch_size:
            raise ValueError(f"{self.samples} training samples give rank fewer than data.batch_size={batch_size}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the shard and sample shuffles; written to shared memory so persistent workers read it too."""
        self._epoch[0] = epoch

    def _rank_samples(self) -> int:
        """Training samples per rank per epoch: whole batches of the rank's share of the declared count."""
        return (self.samples // self.world_size) // self.batch_size * self.batch_size

    def __len__(self) -> int:
        if self.train:
            return self._rank_samples()
        return len(range(self.rank, self.samples, self.world_size))

    def _reader(self) -> tuple[int, int]:
        """(this reader's index g, number of readers G)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _quota(self, reader: int, readers: int) -> int | None:
        """Samples this reader yields per epoch (whole batches); None for evaluation (read everything)."""
        if not self.train:
            return None
        workers = readers // self.world_size
        batches = self._rank_samples() // self.batch_size
        worker = reader - self.rank * workers
        return (batches // workers + (worker < batches % workers)) * self.batch_size

    def _passes(self, epoch: int, reader: int, readers: int) -> Iterator[list[str]]:
        """This reader's shards per pass; training repeats them (each pass reshuffled) until the quota stops it."""
        for pass_ in itertools.count():
            order = list(range(len(self.urls)))
            if self.train:
                random.Random(hash((self.seed, epoch, pass_)) & 0xFFFFFFFF).shuffle(order)
            yield [self.urls[i] for i in order[reader::readers]]
            if not self.train:
                return

    def _stream(self, epoch: int, reader: int, readers: int) -> Iterator[tuple[dict[str, bytes], str]]:
        """Raw samples with their shard URL; the shuffle buffer drains at the end of each pass, so a pass is read
        whole before the next begins (one pass is exactly one epoch when the declared count is right)."""
        for pass_, urls in enumerate(self._passes(epoch, reader, readers)):
            stream = ((sample, url) for url in urls for sample in iter_tar_samples(url))
            if self.train and self.shuffle_buffer > 1:
                stream = _shuffled(stream, self.shuffle_buffer, random.Random(hash((self.seed, epoch, reader, pass_))))
            empty = True
            for item in stream:
                empty = False
                yield item
            if empty:
                raise ValueError(f"shards {urls} hold no samples; check data.options.train_shards")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        epoch = int(self._epoch[0])
        reader, readers = self._reader()
        quota = self._quota(reader, readers)
        for count, (sample, url) in enumerate(self._stream(epoch, reader, readers)):
            if quota is not None and count >= quota:
                return
            image, label = decode_sample(sample, url)
            yield self.transform(image), label


def _shuffled(stream: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style buffer: fill to `size`, then emit a random element for each new one; drain at the end."""
    buffer: list[Any] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class ShardOptions:
    """Where the shards are and how many samples they hold (a stream cannot count itself before it is read)."""

    train_shards: list[str] = field(default_factory=lambda: ["imagenet-shards/train-{000000..001023}.tar"])
    val_shards: list[str] = field(default_factory=lambda: ["imagenet-shards/val-{000000..000063}.tar"])
    train_samples: int = 1281167
    val_samples: int = 50000
    num_classes: int = 1000
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        for key in ("train_samples", "val_samples", "num_classes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        for key in ("train_shards", "val_shards"):
            if not getattr(self, key):
                raise ValueError(f"{key} must name at least one shard URL or brace pattern")
            expand_shards(getattr(self, key))  # a malformed range fails at config time


@register_dataset("imagenet_shards")
class ImageNetShards(DatasetSource):
    """ImageNet (or any image classification set) streamed from tar shards at fsspec URLs; see this module."""

    Options = ShardOptions
    streaming: ClassVar[bool] = True
    device_stats = IMAGENET_STATS

    @classmethod
    def shape(cls, options: Any, image_size: int | None) -> DataShape:
        """RGB samples decoded at image_size (224 by default); the class count is an option."""
        return DataShape(3, image_size or 224, options.num_classes)

    def _urls(self, key: str) -> list[str]:
        return resolve_shards(getattr(self.options, key), self.root)

    def missing(self) -> str | None:
        for key in ("train_shards", "val_shards"):
            try:
                url = missing_shards(self._urls(key))
            except Exception as err:  # an unknown protocol or a storage error: report it as missing, in one line
                first = self._urls(key)[0]
                return (f"ImageNet shard {first} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        f"set data.options.{key} to the shards' URL or brace pattern")
            if url is not None:
                return (f"ImageNet shard not found: {url} (from data.options.{key}, data.root {self.root}); set "
                        f"data.options.{key} to the shards' URL or brace pattern, or data.root to the folder that "
                        "holds relative shard paths")
        return None

    def build(self, image_size: int | None, augment: str) -> DatasetParts:
        size = image_size or 224
        train_tf, test_tf = imagenet_transforms(size, augment, self.uint8_output)
        opt = self.options
        train = TarShardDataset(self._urls("train_shards"), train_tf, samples=opt.train_samples, train=True,
                                shuffle_buffer=opt.shuffle_buffer)
        test = TarShardDataset(self._urls("val_shards"), test_tf, samples=opt.val_samples, train=False)
        spec = DataSpec(3, size, opt.num_classes, opt.train_samples, opt.val_samples)
        return DatasetParts(train, train, test, np.empty(0, dtype=np.int64), spec)

"""The data config and the loaders of one rank: availability checks, validation split, samplers and sharding.

Distributed contract: training uses torch's DistributedSampler (shuffled, seeded, drop_last) so every rank takes the
same number of steps; test and validation use `ShardSampler` (no padding), so metrics summed over ranks are exact.
Streamed sources split themselves across ranks and workers. Sources come from the registry by name; nothing here
knows a data set by its name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from engine.data.registry import DatasetParts, DatasetSource, DataShape, DataSpec, get_source, parse_options
from engine.data.samplers import EpochDistributedSampler, EpochShuffleSampler, ShardSampler, stratified_split
from engine.data.transforms import DeviceNormalize

AugmentChoice = Literal["auto", "none", "standard", "autoaugment"]


@dataclass
class DataConfig:
    """Which data set, where it lives and how it is batched; checked before any worker starts."""

    name: str = "digits"
    root: str = "data"
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int | None = None
    num_workers: int = 0
    image_size: int | None = None
    augment: AugmentChoice = "auto"
    val_fraction: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    pin_memory: bool | None = None
    persistent_workers: bool = True
    prefetch_factor: int | None = None  # batches each worker loads ahead; None keeps torch's default (2)
    normalize_on_device: bool | None = None  # ImageNet sources: uint8 batches, normalised on the device; None: on CUDA

    def __post_init__(self) -> None:
        source = get_source(self.name)
        if not self.root:
            raise ValueError("root must be a non-empty path, e.g. data")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive integer or null, got {self.eval_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer or null (native size), got {self.image_size}")
        self._check_augment(source)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be a positive integer or null, got {self.prefetch_factor}")
        if self.normalize_on_device and source.device_stats is None:
            raise ValueError(f"normalize_on_device is not supported by data set {self.name!r} (its loaders "
                             "normalise); leave it null or false")
        if self.val_fraction > 0 and source.streaming:
            raise ValueError(f"val_fraction must be 0 for the streamed data set {self.name!r} (a stream cannot be "
                             "split by index); hold out shards and name them in options.val_shards instead")
        source.check(parse_options(self.name, self.options), self.image_size)

    def _check_augment(self, source: type[DatasetSource]) -> None:
        """A known augmentation first, then one this data set supports."""
        if self.augment not in ("auto", "none", "standard", "autoaugment"):
            raise ValueError(f"augment must be one of auto, none, standard, autoaugment, got {self.augment!r}")
        choices = ("auto",) + source.augments
        if self.augment not in choices:
            supported = ", ".join(choices)
            raise ValueError(f"augment {self.augment!r} is not supported by data set {self.name!r}; use {supported}")

    @property
    def resolved_augment(self) -> str:
        """'auto' resolved per data set: standard for natural images, none for digits, MNIST-likes and synthetic."""
        return get_source(self.name).auto_augment if self.augment == "auto" else self.augment

    @property
    def resolved_eval_batch_size(self) -> int:
        """Evaluation batch size; defaults to the training one."""
        return self.eval_batch_size or self.batch_size


@dataclass
class Loaders:
    """Everything the trainer reads from the data part. val is None unless val_fraction > 0."""

    train: DataLoader
    test: DataLoader
    val: DataLoader | None
    spec: DataSpec
    train_sampler: Sampler | IterableDataset | None  # whatever has set_epoch: the sampler, or a streamed data set
    device_normalize: DeviceNormalize | None = None  # set when batches are uint8: apply after moving to the device


def data_shape(cfg: DataConfig) -> DataShape:
    """Shape of ``cfg``'s samples after its resizing, without reading the data set: the source answers."""
    return get_source(cfg.name).shape(parse_options(cfg.name, cfg.options), cfg.image_size)


def _source(cfg: DataConfig) -> DatasetSource:
    """Instantiate the registered source with its parsed options."""
    return get_source(cfg.name)(cfg.root, parse_options(cfg.name, cfg.options))


def check_data_available(cfg: DataConfig) -> None:
    """Run by the launcher before workers start: fetch the data once if data.download is set (so ranks never race to
    download), then raise a one-line FileNotFoundError naming the path, layout and fix if files are still missing."""
    source = _source(cfg)
    if source.missing() and cfg.download and source.downloadable:
        source.download()
    message = source.missing()
    if message:
        raise FileNotFoundError(message)


def _ensure_available(source: DatasetSource, cfg: DataConfig, rank: int, world_size: int) -> None:
    """Download if asked (rank 0 first when a process group exists), else raise our message, not torchvision's."""
    if source.missing() and cfg.download and source.downloadable:
        grouped = world_size > 1 and dist.is_available() and dist.is_initialized()
        if rank == 0 or not grouped:
            source.download()
        if grouped:
            dist.barrier()
    message = source.missing()
    if message:
        raise FileNotFoundError(message)


def _split_train(parts: DatasetParts, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Carve a seeded, stratified validation subset (test-time transform) out of train; train keeps the rest."""
    if fraction <= 0:
        return parts.train, None
    keep, held_out = stratified_split(parts.train_targets, fraction, seed)
    if len(held_out) == 0 or len(keep) == 0:
        raise ValueError(
            f"val_fraction {fraction} leaves {len(held_out)} validation and {len(keep)} training samples; "
            "choose a fraction that leaves both non-empty"
        )
    return Subset(parts.train, keep.tolist()), Subset(parts.train_eval, held_out.tolist())


def _loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, drop_last: bool, cfg: DataConfig,
            device: torch.device, worker_seed: int) -> DataLoader:
    """One DataLoader with the config's worker, pinning, prefetch and seeding settings."""
    workers = cfg.num_workers
    pin = device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=cfg.persistent_workers and workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(worker_seed),  # seeds worker RNGs (augmentation) reproducibly
    )


def _worker_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible worker seeds per rank."""
    return (seed * 65537 + rank) % (2**63)


def build_loaders(
    cfg: DataConfig,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device = torch.device("cpu"),
) -> Loaders:
    """Loaders for this rank. Train drops its last batch only when that batch would hold a single sample (BatchNorm
    fails on a batch of one); with world_size > 1 DistributedSampler(drop_last=True) also evens out ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    source = _source(cfg)
    _ensure_available(source, cfg, rank, world_size)
    on_device = device.type == "cuda" if cfg.normalize_on_device is None else cfg.normalize_on_device
    normalize = None
    if on_device and source.device_stats is not None:
        source.uint8_output = True
        normalize = DeviceNormalize(*source.device_stats)
    parts = source.build(cfg.image_size, cfg.resolved_augment)
    if isinstance(parts.train, IterableDataset):
        loaders = _stream_loaders(parts, cfg, seed=seed, rank=rank, world_size=world_size, device=device)
    else:
        loaders = _map_loaders(parts, cfg, seed=seed, rank=rank, world_size=world_size, device=device)
    return dataclasses.replace(loaders, device_normalize=normalize)


def _map_loaders(parts: DatasetParts, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 device: torch.device) -> Loaders:
    """Loaders over indexable data sets: optional validation split, a per-rank train sampler, exact eval shards."""
    train_set, val_set = _split_train(parts, cfg.val_fraction, seed)
    if len(train_set) < world_size:
        raise ValueError(f"world_size {world_size} exceeds the {len(train_set)} training samples of {cfg.name!r}")
    train_sampler: Sampler
    if world_size > 1:
        train_sampler = EpochDistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        train_sampler = EpochShuffleSampler(len(train_set), seed)
    per_rank = len(train_sampler)
    drop_last = per_rank > 1 and per_rank % cfg.batch_size == 1
    worker_seed = _worker_seed(seed, rank)
    eval_bs = cfg.resolved_eval_batch_size
    val_loader = None
    if val_set is not None:
        val_loader = _loader(val_set, eval_bs, ShardSampler(len(val_set), rank, world_size), False, cfg, device,
                             worker_seed)
    spec = dataclasses.replace(parts.spec, train_size=len(train_set), val_size=len(val_set) if val_set else 0)
    return Loaders(
        train=_loader(train_set, cfg.batch_size, train_sampler, drop_last, cfg, device, worker_seed),
        test=_loader(parts.test, eval_bs, ShardSampler(len(parts.test), rank, world_size), False, cfg, device,
                     worker_seed),
        val=val_loader,
        spec=spec,
        train_sampler=train_sampler,
    )


def _stream_loaders(parts: DatasetParts, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                    device: torch.device) -> Loaders:
    """Loaders over streamed data sets (engine.data.shards): the data sets split themselves across ranks and
    workers, so there is no sampler; train yields whole batches only (its length is fixed by the declared count)."""
    eval_bs = cfg.resolved_eval_batch_size
    parts.train.configure(seed=seed, rank=rank, world_size=world_size, batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers)
    parts.test.configure(seed=seed, rank=rank, world_size=world_size, batch_size=eval_bs, num_workers=cfg.num_workers)
    worker_seed = _worker_seed(seed, rank)
    return Loaders(
        train=_loader(parts.train, cfg.batch_size, None, True, cfg, device, worker_seed),
        test=_loader(parts.test, eval_bs, None, False, cfg, device, worker_seed),
        val=None,
        spec=parts.spec,
        train_sampler=parts.train,
    )

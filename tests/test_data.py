"""Tests of engine.data (registry, sources, loaders): embedded and synthetic data, fake on-disk copies of the
file-backed data sets in their real formats, config errors, validation split, and the distributed sharding contract."""

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from engine.data import (
    DataConfig,
    DatasetParts,
    DatasetSource,
    DataSpec,
    EpochShuffleSampler,
    ShardSampler,
    build_loaders,
    check_data_available,
    list_datasets,
    register_dataset,
    TensorImageDataset,
    stratified_split,
)
from engine.data import registry as datasets


def _all_labels(loader: torch.utils.data.DataLoader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


# ---- digits


def test_digits_sizes_shapes_and_normalisation() -> None:
    loaders = build_loaders(DataConfig(batch_size=2000), seed=0)
    assert loaders.spec == DataSpec(channels=1, image_size=8, num_classes=10, train_size=1437, test_size=360)
    x, y = next(iter(loaders.train))
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert loaders.val is None and len(_all_labels(loaders.test)) == 360
    assert set(_all_labels(loaders.test).tolist()) == set(range(10))


def test_digits_split_is_fixed_and_train_order_is_seeded() -> None:
    a = build_loaders(DataConfig(batch_size=64), seed=1)
    b = build_loaders(DataConfig(batch_size=64), seed=2)
    xa, xb = torch.cat([x for x, _ in a.test]), torch.cat([x for x, _ in b.test])
    assert torch.equal(xa, xb), "the test split must not depend on the run seed"
    first = next(iter(a.train))[1]
    assert torch.equal(first, next(iter(build_loaders(DataConfig(batch_size=64), seed=1).train))[1])
    assert not torch.equal(first, next(iter(b.train))[1])


def test_digits_upsample_channels_and_augment() -> None:
    cfg = DataConfig(image_size=32, options={"channels": 3}, augment="standard", batch_size=16)
    loaders = build_loaders(cfg, seed=0)
    assert loaders.spec.image_size == 32 and loaders.spec.channels == 3
    assert next(iter(loaders.train))[0].shape == (16, 3, 32, 32)
    assert next(iter(loaders.test))[0].shape == (16, 3, 32, 32)
    one = build_loaders(DataConfig(image_size=32, batch_size=4), seed=0)
    assert next(iter(one.test))[0].shape == (4, 1, 32, 32)


def test_train_drops_only_a_last_batch_of_one() -> None:
    # digits train has 1437 samples: 1437 % 2 == 1 -> drop; 1437 % 100 == 37 -> keep.
    assert len(build_loaders(DataConfig(batch_size=2), seed=0).train) == 718
    assert len(build_loaders(DataConfig(batch_size=100), seed=0).train) == 15
    assert len(build_loaders(DataConfig(batch_size=2, eval_batch_size=7), seed=0).test) == 52


# ---- synthetic


def test_synthetic_shapes_and_determinism() -> None:
    opts = {"channels": 2, "image_size": 12, "num_classes": 5, "train_size": 100, "test_size": 40}
    a = build_loaders(DataConfig(name="synthetic", options=opts, batch_size=100), seed=0)
    assert a.spec == DataSpec(2, 12, 5, 100, 40)
    x, y = next(iter(a.train))
    assert x.shape == (100, 2, 12, 12) and set(y.tolist()) == set(range(5))
    b = build_loaders(DataConfig(name="synthetic", options=opts, batch_size=100), seed=5)
    assert torch.equal(torch.cat([x for x, _ in a.test]), torch.cat([x for x, _ in b.test]))
    other = build_loaders(DataConfig(name="synthetic", options={**opts, "seed": 1}, batch_size=100), seed=0)
    assert not torch.equal(next(iter(a.test))[0], next(iter(other.test))[0])
    sized = build_loaders(DataConfig(name="synthetic", image_size=16, batch_size=8), seed=0)
    assert next(iter(sized.train))[0].shape == (8, 3, 16, 16)


def test_synthetic_is_learnable_but_not_noiseless() -> None:
    cfg = DataConfig(name="synthetic", batch_size=4096, options={"train_size": 512, "test_size": 256})
    loaders = build_loaders(cfg, seed=0)
    x, y = next(iter(loaders.train))
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    tx, ty = next(iter(loaders.test))
    pred = torch.cdist(tx.flatten(1), means).argmin(1)
    assert (pred == ty).float().mean() > 0.9
    assert (tx.flatten(1) - means[ty]).std() > 0.3  # samples are not copies of their class mean


@pytest.mark.parametrize(
    "options, message",
    [
        ({"chanels": 3}, "options.chanels is not an option of data set 'synthetic'; valid options: channels"),
        ({"channels": 0}, "options.channels must be a positive integer"),
        ({"num_classes": 1}, "options.num_classes must be at least 2"),
        ({"train_size": "many"}, "options.train_size must be of type int"),
        ({"noise": -1.0}, "options.noise must be >= 0"),
    ],
)
def test_synthetic_option_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        DataConfig(name="synthetic", options=options)


def test_synthetic_option_coercion_and_conflict() -> None:
    cfg = DataConfig(name="synthetic", options={"train_size": "64", "image_size": "null"}, batch_size=64)
    assert build_loaders(cfg, seed=0).spec.train_size == 64
    with pytest.raises(ValueError, match=r"^options.image_size \(8\) conflicts with image_size \(16\)"):
        DataConfig(name="synthetic", image_size=16, options={"image_size": 8})


# ---- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "cifar"}, r"name 'cifar' is not a registered data set \(did you mean 'cifar10'\?\); valid: "),
        ({"name": "zzz"}, r"name 'zzz' is not a registered data set; valid: cifar10, cifar100, digits"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"eval_batch_size": -1}, "eval_batch_size must be a positive integer"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"augment": "heavy"}, "augment must be one of auto, none, standard, autoaugment"),
        ({"augment": "autoaugment"}, "augment 'autoaugment' is not supported by data set 'digits'"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"root": ""}, "root must be a non-empty path"),
        ({"name": "cifar10", "options": {"channels": 3}}, "options.channels is not an option of data set 'cifar10'; "
         "valid options: verify"),
        ({"options": {"channels": 2}}, "options.channels must be 1 or 3, got 2"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        DataConfig(**kwargs)


def test_auto_augment_resolution() -> None:
    assert DataConfig().resolved_augment == "none"
    assert DataConfig(name="synthetic").resolved_augment == "none"
    assert DataConfig(name="mnist").resolved_augment == "none"
    assert DataConfig(name="cifar10").resolved_augment == "standard"
    assert DataConfig(name="cifar10", augment="autoaugment").resolved_augment == "autoaugment"


def test_registry_wide_config_and_availability(tmp_path: Path) -> None:
    for name in list_datasets():
        cfg = DataConfig(name=name, root=str(tmp_path))
        assert cfg.resolved_augment in datasets.get_source(name).augments
        if name in ("digits", "synthetic"):
            check_data_available(cfg)
            continue
        with pytest.raises(FileNotFoundError) as err:
            check_data_available(cfg)
        text = str(err.value)
        assert str(tmp_path) in text and "data.root" in text and "\n" not in text, text


def test_register_dataset_rejects_duplicates_and_plugs_in() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(DatasetSource)

    class Tiny(DatasetSource):
        augments = ("none",)
        auto_augment = "none"

        def build(self, image_size: int | None, augment: str) -> DatasetParts:
            data = TensorImageDataset(torch.zeros(6, 1, 4, 4), torch.arange(6) % 2)
            return DatasetParts(data, data, data, data.labels.numpy(), DataSpec(1, 4, 2, 6, 6))

    register_dataset("tiny_test_only")(Tiny)
    try:
        loaders = build_loaders(DataConfig(name="tiny_test_only", batch_size=4), seed=0)
        assert loaders.spec.num_classes == 2 and len(loaders.train) == 2
    finally:
        del datasets._REGISTRY["tiny_test_only"]


# ---- validation


def test_val_split_is_stratified_seeded_and_disjoint() -> None:
    cfg = DataConfig(val_fraction=0.2, batch_size=2000)
    a, b = build_loaders(cfg, seed=3), build_loaders(cfg, seed=3)
    assert a.val is not None and a.spec.train_size + a.spec.val_size == 1437
    val_labels = _all_labels(a.val)
    assert len(val_labels) == a.spec.val_size and torch.equal(val_labels, _all_labels(b.val))
    counts = torch.bincount(val_labels, minlength=10).float()
    assert counts.min() >= 0.8 * counts.max()
    targets = np.arange(100) % 4
    keep, held = stratified_split(targets, 0.25, seed=1)
    assert len(held) == 25 and not set(keep) & set(held) and len(keep) + len(held) == 100
    assert sorted(np.bincount(targets[held])) == [6, 6, 6, 7]
    assert not np.array_equal(held, stratified_split(targets, 0.25, seed=2)[1])


def test_val_split_too_small_is_an_error() -> None:
    cfg = DataConfig(name="synthetic", val_fraction=0.01, options={"train_size": 20}, batch_size=4)
    with pytest.raises(ValueError, match="^val_fraction 0.01 leaves 0 validation"):
        build_loaders(cfg, seed=0)


# ---- distributed


def test_distributed_eval_shards_cover_each_index_once() -> None:
    cfg = DataConfig(name="synthetic", batch_size=16, val_fraction=0.1,
                     options={"train_size": 203, "test_size": 101})
    ranks = [build_loaders(cfg, seed=0, rank=r, world_size=2) for r in range(2)]
    for split in ("test", "val"):
        shards = [list(getattr(r, split).sampler) for r in ranks]
        size = len(getattr(ranks[0], split).dataset)
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(size))
        total = sum(len(_all_labels(getattr(r, split))) for r in ranks)
        assert total == size
    assert isinstance(ranks[0].test.sampler, ShardSampler)


def test_distributed_train_sampler_per_rank_and_seeded() -> None:
    cfg = DataConfig(name="synthetic", batch_size=16, options={"train_size": 101, "test_size": 10})
    r0, r1 = (build_loaders(cfg, seed=7, rank=r, world_size=2) for r in range(2))
    assert isinstance(r0.train_sampler, DistributedSampler)
    assert len(r0.train_sampler) == len(r1.train_sampler) == 50  # drop_last evens ranks, no padding
    r0.train_sampler.set_epoch(1)
    r1.train_sampler.set_epoch(1)
    i0, i1 = list(r0.train_sampler), list(r1.train_sampler)
    assert not set(i0) & set(i1)
    again = build_loaders(cfg, seed=7, rank=0, world_size=2).train_sampler
    again.set_epoch(1)
    assert list(again) == i0
    again.set_epoch(2)
    assert list(again) != i0
    other = build_loaders(cfg, seed=8, rank=0, world_size=2).train_sampler
    other.set_epoch(1)
    assert list(other) != i0
    with pytest.raises(ValueError, match="^rank must be in"):
        build_loaders(cfg, seed=0, rank=2, world_size=2)


def test_single_process_shuffle_depends_on_seed_and_epoch() -> None:
    sampler = EpochShuffleSampler(50, seed=4)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    resumed = EpochShuffleSampler(50, seed=4)
    resumed.set_epoch(1)
    assert list(resumed) == list(sampler)


def test_worker_processes_and_pinning_settings() -> None:
    cfg = DataConfig(name="synthetic", batch_size=32, num_workers=1, options={"train_size": 64, "test_size": 32})
    loaders = build_loaders(cfg, seed=0)
    assert loaders.train.persistent_workers and not loaders.train.pin_memory
    assert len(_all_labels(loaders.train)) == 64
    no_workers = build_loaders(DataConfig(name="synthetic", num_workers=0), seed=0)
    assert not no_workers.train.persistent_workers


# ---- fake on-disk copies, real formats


def _write_cifar10(root: Path, per_batch: int = 4, test: int = 6) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dimensions, then raw bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, train: int = 12, test: int = 5) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def _write_image(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix == ".JPEG" else "PNG")


def test_cifar10_from_pickles(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), batch_size=8, options={"verify": False})   # not the md5s
    check_data_available(cfg)
    loaders = build_loaders(cfg, seed=0)
    assert loaders.spec == DataSpec(3, 32, 10, 20, 6)
    x, y = next(iter(loaders.train))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    assert _all_labels(loaders.test).tolist() == [0, 1, 2, 3, 4, 5]
    auto = build_loaders(DataConfig(name="cifar10", root=str(tmp_path), augment="autoaugment", image_size=40,
                                    batch_size=4, val_fraction=0.5, options={"verify": False}), seed=0)
    assert next(iter(auto.train))[0].shape == (4, 3, 40, 40) and auto.spec.val_size == 10
    assert next(iter(auto.val))[0].shape == (4, 3, 40, 40)


def test_cifar10_partial_copy_names_missing_file(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match=r"; missing data_batch_3\); set data.download=true") as err:
        build_loaders(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    assert "set data.download=true" in str(err.value)


def test_mnist_from_idx_files(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    cfg = DataConfig(name="mnist", root=str(tmp_path), batch_size=4, augment="standard")
    loaders = build_loaders(cfg, seed=0)
    assert loaders.spec == DataSpec(1, 28, 10, 12, 5)
    assert next(iter(loaders.train))[0].shape == (4, 1, 28, 28)
    rgb = build_loaders(DataConfig(name="mnist", root=str(tmp_path), batch_size=5, options={"channels": 3},
                                   image_size=32, augment="autoaugment"), seed=0)
    x, y = next(iter(rgb.test))
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0, 1, 2, 3, 4]
    assert next(iter(rgb.train))[0].shape == (5, 3, 32, 32)


def test_missing_mnist_message(tmp_path: Path) -> None:
    cfg = DataConfig(name="mnist", root=str(tmp_path / "nowhere"))
    expected = (f"MNIST data not found at {tmp_path / 'nowhere' / 'MNIST' / 'raw'} (expected uncompressed idx files "
                "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte); "
                "set data.download=true to fetch it, or set data.root to the folder that holds MNIST/raw/")
    for call in (lambda: check_data_available(cfg), lambda: build_loaders(cfg, seed=0)):
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert str(err.value) == expected


@pytest.mark.parametrize("official_val", [True, False])
def test_tinyimagenet_folder_layouts(tmp_path: Path, official_val: bool) -> None:
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    for k, wnid in enumerate(wnids):
        for i in range(2):
            _write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 64, 10 * k + i)
    notes = []
    for k, wnid in enumerate(wnids):
        if official_val:
            _write_image(base / "val" / "images" / f"val_{k}.JPEG", 64, 100 + k)
            notes.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63\n")
        else:
            _write_image(base / "val" / wnid / f"val_{k}.png", 64, 100 + k)
    if official_val:
        (base / "val" / "val_annotations.txt").write_text("".join(notes))
    cfg = DataConfig(name="tinyimagenet", root=str(tmp_path), batch_size=3)
    check_data_available(cfg)
    loaders = build_loaders(cfg, seed=0)
    assert loaders.spec == DataSpec(3, 64, 3, 6, 3)
    assert next(iter(loaders.train))[0].shape == (3, 3, 64, 64)
    assert sorted(_all_labels(loaders.test).tolist()) == [0, 1, 2]
    test_set = loaders.test.dataset
    assert [Path(p).name for p, _ in test_set.samples if _ == 0][0].startswith("val_1")  # n01 sorts first


def test_imagenet_folder_layout(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 1)):
        for k, cls in enumerate(["cat", "dog"]):
            for i in range(n):
                _write_image(tmp_path / "imagenet" / split / cls / f"{i}.JPEG", 40, 7 * k + i)
    cfg = DataConfig(name="imagenet", root=str(tmp_path), image_size=32, batch_size=4)
    check_data_available(cfg)
    loaders = build_loaders(cfg, seed=0)
    assert loaders.spec == DataSpec(3, 32, 2, 6, 2)
    assert next(iter(loaders.train))[0].shape == (4, 3, 32, 32)
    x, y = next(iter(loaders.test))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    flat = DataConfig(name="imagenet", root=str(tmp_path / "imagenet"), image_size=32, augment="none")
    assert build_loaders(flat, seed=0).spec.train_size == 6  # root itself holding train/ and val/


def test_imagenet_cannot_download(tmp_path: Path) -> None:
    cfg = DataConfig(name="imagenet", root=str(tmp_path), download=True)
    with pytest.raises(FileNotFoundError, match="ImageNet data not found at .*download it manually, or set data.root"):
        check_data_available(cfg)

"""Tar-shard streaming (engine/data/shards.py): tiny shards written with tarfile + PIL into memory:// and a tmp folder,
read back through the real loaders for two ranks (and two workers each): disjoint, complete, seeded, sized."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DataConfig, build_loaders, check_data_available
from engine.data.shards import expand_shards, iter_tar_samples

SHARDS, PER_SHARD = 8, 5


def _image_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write_shards(base: str, prefix: str, shards: int = SHARDS, per_shard: int = PER_SHARD) -> None:
    """Shard i holds samples i*per_shard ... ; the label of a sample is its global index (so samples are countable)."""
    for i in range(shards):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            for j in range(per_shard):
                index = i * per_shard + j
                ext = "png" if index % 2 else "jpg"
                files = {f"{index:06d}.{ext}": _image_bytes(index, "PNG" if ext == "png" else "JPEG"),
                         f"{index:06d}.cls": str(index).encode()}
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with fsspec.open(f"{base}/{prefix}-{i:06d}.tar", "wb") as f:
            f.write(raw.getvalue())


def _cfg(base: str, **kw: object) -> DataConfig:
    options = {"train_shards": f"{base}/train-{{000000..{SHARDS - 1:06d}}}.tar",
               "val_shards": [f"{base}/val-{{000000..000003}}.tar"], "train_samples": SHARDS * PER_SHARD,
               "val_samples": 4 * PER_SHARD, "num_classes": SHARDS * PER_SHARD, "shuffle_buffer": 4}
    options.update(kw.pop("options", {}))  # type: ignore[arg-type]
    return DataConfig(name="imagenet_shards", batch_size=2, image_size=16, augment="none", options=options,
                      **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def memory_shards() -> str:
    base = "memory://imnet-test"
    _write_shards(base, "train")
    _write_shards(base, "val", shards=4)
    return base


def _labels(loader: torch.utils.data.DataLoader) -> list[int]:
    out = []
    for images, labels in loader:
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
        out += labels.tolist()
    return out


def _epoch(cfg: DataConfig, epoch: int, world: int = 2) -> list[list[int]]:
    per_rank = []
    for rank in range(world):
        loaders = build_loaders(cfg, seed=3, rank=rank, world_size=world)
        loaders.train_sampler.set_epoch(epoch)
        labels = _labels(loaders.train)
        assert len(labels) == len(loaders.train) * cfg.batch_size  # whole batches, exactly len(loader) of them
        per_rank.append(labels)
    return per_rank


def test_brace_patterns_and_lists() -> None:
    assert expand_shards(["a-{08..10}.tar"]) == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_shards(["s3://b/{x,y}-{0..1}.tar", "c.tar"]) == [
        "s3://b/x-0.tar", "s3://b/x-1.tar", "s3://b/y-0.tar", "s3://b/y-1.tar", "c.tar"]
    with pytest.raises(ValueError, match="empty"):
        expand_shards(["a-{5..1}.tar"])


def test_samples_group_by_key(memory_shards: str) -> None:
    samples = list(iter_tar_samples(f"{memory_shards}/train-000001.tar"))
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(5, 10)]
    assert all("cls" in s and ("jpg" in s or "png" in s) for s in samples)


def test_two_ranks_disjoint_and_complete_each_epoch(memory_shards: str) -> None:
    cfg = _cfg(memory_shards)
    first = _epoch(cfg, 0)
    assert not set(first[0]) & set(first[1])
    assert sorted(first[0] + first[1]) == list(range(SHARDS * PER_SHARD))
    again, second = _epoch(cfg, 0), _epoch(cfg, 1)
    assert again == first                                   # order depends only on (seed, epoch)
    assert sorted(second[0] + second[1]) == list(range(SHARDS * PER_SHARD))
    assert second != first                                  # shards and samples reshuffled per epoch


def test_eval_stream_reads_every_sample_once(memory_shards: str) -> None:
    labels = []
    for rank in range(2):
        labels += _labels(build_loaders(_cfg(memory_shards), seed=0, rank=rank, world_size=2).test)
    assert sorted(labels) == list(range(4 * PER_SHARD))


def test_local_folder_two_workers_per_rank(tmp_path: Path) -> None:
    _write_shards(str(tmp_path), "train")
    _write_shards(str(tmp_path), "val", shards=4)
    cfg = _cfg("", root=str(tmp_path), num_workers=2, prefetch_factor=1,
               options={"train_shards": f"train-{{000000..{SHARDS - 1:06d}}}.tar",
                        "val_shards": "val-{000000..000003}.tar"})
    check_data_available(cfg)  # relative shard paths resolve under data.root
    per_rank = _epoch(cfg, 1)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(SHARDS * PER_SHARD))


def test_declared_count_fixes_the_epoch_length(memory_shards: str) -> None:
    cfg = _cfg(memory_shards, options={"train_samples": 64})   # more than the shards hold: readers start again
    per_rank = _epoch(cfg, 0)
    assert [len(p) for p in per_rank] == [32, 32]
    assert all(max(Counter(p).values()) <= 2 for p in per_rank)


@pytest.mark.parametrize("url, key", [
    ("memory://nowhere/train-{000000..000003}.tar", "train_shards"),
    ("nosuchproto://bucket/train-{000000..000003}.tar", "train_shards"),
])
def test_bad_url_is_one_line_naming_url_and_fix(memory_shards: str, url: str, key: str) -> None:
    cfg = _cfg(memory_shards, options={"train_shards": url})
    with pytest.raises(FileNotFoundError) as err:
        check_data_available(cfg)
    text = str(err.value)
    assert "\n" not in text and url.split("{")[0] in text and f"data.options.{key}" in text, text


def test_config_errors(memory_shards: str) -> None:
    with pytest.raises(ValueError, match="val_fraction must be 0"):
        _cfg(memory_shards, val_fraction=0.1)
    with pytest.raises(ValueError, match="options.train_shards must be a string or a list of strings"):
        _cfg(memory_shards, options={"train_shards": 3})
    with pytest.raises(ValueError, match="prefetch_factor"):
        _cfg(memory_shards, prefetch_factor=0)
    with pytest.raises(ValueError, match="cannot feed"):
        build_loaders(_cfg(memory_shards, num_workers=3), seed=0, rank=0, world_size=2)


def test_uint8_batches_normalised_on_device_match_the_float_path(memory_shards: str) -> None:
    floats = build_loaders(_cfg(memory_shards), seed=1)
    raw = build_loaders(_cfg(memory_shards, normalize_on_device=True), seed=1)
    assert floats.device_normalize is None and raw.device_normalize is not None
    # one loader after the other: memory:// hands every reader of a file the same file object (shared position)
    for (x, y), (u, v) in zip(list(floats.train), list(raw.train)):
        assert u.dtype == torch.uint8 and torch.equal(y, v)
        torch.testing.assert_close(raw.device_normalize(u), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="normalize_on_device is not supported by data set 'digits'"):
        DataConfig(name="digits", normalize_on_device=True)


def test_trainer_runs_on_shards_with_device_normalisation(memory_shards: str, tmp_path: Path) -> None:
    from engine.run_config import load_config
    from engine.trainer import train

    options = _cfg(memory_shards).options
    overrides = [f"output_dir={tmp_path}", "data.name=imagenet_shards", "data.image_size=16", "data.batch_size=4",
                 "data.augment=standard", "data.normalize_on_device=true", "model.name=conv", "train.epochs=2",
                 "train.device=cpu", "monitor.progress=false", "monitor.tensorboard=false",
                 "checkpoint.save_final=false", "sparsity.method=random", "sparsity.density=0.5"]
    overrides += [f"data.options.{k}={v}" for k, v in options.items() if k != "val_shards"]
    overrides.append(f"data.options.val_shards={options['val_shards'][0]}")
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 2 * (SHARDS * PER_SHARD // 4) and summary["epochs"] == 2
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_loss"] > 0

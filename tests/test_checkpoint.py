"""Checkpoint storage: round trips on memory:// and local disk, atomic writes, pruning, resume lookup, RNG state."""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch import nn

from engine import checkpoint as ckpt
from engine.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    Checkpointer,
    capture_rng,
    load_state,
    resolve_resume,
    restore_rng,
    save_state,
)


class _Custom:
    """A class torch's weights_only loader must refuse."""

    def __init__(self) -> None:
        self.payload = 42


@pytest.fixture
def memory_dir() -> Iterator[str]:
    """A fresh directory in fsspec's process-wide memory store, removed afterwards."""
    url = f"memory://sparsetrain-test-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(params=["memory", "local"])
def any_dir(request: pytest.FixtureRequest, memory_dir: str, tmp_path: Path) -> str:
    """Every storage test runs on both an in-memory URL and a real local directory."""
    return memory_dir if request.param == "memory" else str(tmp_path / "ckpts")


def _names(directory: str) -> list[str]:
    """Basenames in a directory, whatever the filesystem, less the checksum sidecars (each file written here must
    have one: checked, then left out; tests/test_checkpoint_integrity.py tests them)."""
    fs, path = fsspec.core.url_to_fs(directory)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    for name in names:
        if name.endswith(".pt"):
            assert f"{name}{ckpt.META_SUFFIX}" in names, name
    return [name for name in names if not name.endswith(ckpt.META_SUFFIX)]


def _rich_state() -> dict:
    """Model + optimizer (with real momentum buffers) + nested plain data + a bool mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "masks": {"0.weight": torch.rand(3, 4) > 0.5, "2.weight": torch.ones(2, 3, dtype=torch.bool)},
        "meta": {"epoch": 3, "step": 120, "lr": 0.05, "name": "rigl", "history": [1, 2.5, "x", [True, None]]},
    }


def _assert_same(a: object, b: object) -> None:
    """Structural equality that compares tensors exactly, including dtype."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_and_errors_start_with_field_name() -> None:
    assert CheckpointConfig() == CheckpointConfig(dir=None, every_epochs=1, keep=2, save_final=True)
    for kwargs, field in [({"keep": 0}, "keep"), ({"every_epochs": 0}, "every_epochs"), ({"keep": 1.5}, "keep"),
                          ({"dir": ""}, "dir"), ({"save_final": "yes"}, "save_final"), ({"keep": True}, "keep")]:
        with pytest.raises(ValueError) as info:
            CheckpointConfig(**kwargs)
        message = str(info.value)
        assert message.startswith(field + " ") and "\n" not in message


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_rich_state(any_dir: str) -> None:
    state = _rich_state()
    url = f"{any_dir}/one.pt"
    save_state(url, state)
    loaded = load_state(url)
    _assert_same(state, loaded)
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0
    assert _names(any_dir) == ["one.pt"]  # no temporary sibling left behind


def test_loaded_optimizer_state_resumes_identically(any_dir: str) -> None:
    """A loaded SGD-momentum state must continue exactly like the original optimizer."""
    state = _rich_state()
    save_state(f"{any_dir}/s.pt", state)
    loaded = load_state(f"{any_dir}/s.pt")

    def step_from(saved: dict) -> dict:
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        model.load_state_dict(saved["model"])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        optimizer.load_state_dict(saved["optimizer"])
        torch.manual_seed(1)
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        return model.state_dict()

    _assert_same(step_from(state), step_from(loaded))


def test_overwrite_same_name(any_dir: str) -> None:
    save_state(f"{any_dir}/a.pt", {"v": 1})
    save_state(f"{any_dir}/a.pt", {"v": 2})
    assert load_state(f"{any_dir}/a.pt") == {"v": 2}
    assert _names(any_dir) == ["a.pt"]


# ------------------------------------------------------------------------------------------------ atomicity


def test_failed_serialisation_keeps_previous(any_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    saver = Checkpointer(any_dir, keep=2)
    first = saver.save({"v": torch.tensor([1])}, epoch=1, step=10)

    def exploding_save(obj: object, f: io.BytesIO, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ckpt.torch, "save", exploding_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        saver.save({"v": torch.tensor([2])}, epoch=2, step=20)
    monkeypatch.undo()
    assert saver.latest() == first
    assert torch.equal(load_state(first)["v"], torch.tensor([1]))
    assert _names(any_dir) == ["ckpt-e0001-s00000010.pt", "latest"]


@pytest.mark.parametrize("fail_at", ["write", "move"])
def test_failed_write_keeps_previous(any_dir: str, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:
    """Crash halfway through writing the bytes, or just before the rename: the final name must never appear."""
    saver = Checkpointer(any_dir, keep=2)
    first = saver.save({"v": torch.tensor([1])}, epoch=1, step=10)
    real_write = ckpt._write_file

    def half_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
        real_write(fs, path, data[: len(data) // 2])
        raise OSError("connection reset")

    def failing_move(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
        raise OSError("connection reset")

    if fail_at == "write":
        monkeypatch.setattr(ckpt, "_write_file", half_write)
    else:
        monkeypatch.setattr(ckpt, "_move", failing_move)
    with pytest.raises(OSError, match="connection reset"):
        saver.save({"v": torch.tensor([2])}, epoch=2, step=20)
    monkeypatch.undo()

    assert _names(any_dir) == ["ckpt-e0001-s00000010.pt", "latest"]  # no partial final file, no temp left
    assert saver.latest() == first
    assert torch.equal(load_state(first)["v"], torch.tensor([1]))


def test_failed_pointer_write_leaves_loadable_latest(any_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the checkpoint lands but the pointer update crashes, latest() still finds a complete checkpoint."""
    saver = Checkpointer(any_dir, keep=3)
    saver.save({"v": 1}, epoch=1, step=1)
    real_atomic = ckpt._atomic_write

    def fail_on_pointer(url: str, data: bytes) -> None:
        if url.endswith("/latest"):
            raise OSError("lost")
        real_atomic(url, data)

    monkeypatch.setattr(ckpt, "_atomic_write", fail_on_pointer)
    with pytest.raises(OSError):
        saver.save({"v": 2}, epoch=2, step=2)
    monkeypatch.undo()
    assert load_state(saver.latest())["v"] in (1, 2)


# ------------------------------------------------------------------------------------------------ Checkpointer


def test_keep_prunes_oldest(any_dir: str) -> None:
    saver = Checkpointer(any_dir, keep=2)
    urls = [saver.save({"epoch": e}, epoch=e, step=e * 100) for e in range(1, 5)]
    assert urls[-1] == f"{any_dir}/ckpt-e0004-s00000400.pt"
    assert _names(any_dir) == ["ckpt-e0003-s00000300.pt", "ckpt-e0004-s00000400.pt", "latest"]
    assert saver.checkpoints() == urls[-2:]
    assert saver.latest() == urls[-1]
    assert load_state(saver.latest())["epoch"] == 4


def test_keep_one(any_dir: str) -> None:
    saver = Checkpointer(any_dir, keep=1)
    for step in range(3):
        last = saver.save({"s": step}, epoch=0, step=step)
    assert saver.checkpoints() == [last]


def test_just_written_checkpoint_survives_pruning(any_dir: str) -> None:
    """Resuming from an older checkpoint and saving again must not delete the new file."""
    saver = Checkpointer(any_dir, keep=2)
    for epoch in (5, 6):
        saver.save({"e": epoch}, epoch=epoch, step=epoch)
    new = saver.save({"e": 3}, epoch=3, step=3)
    assert new in saver.checkpoints()
    assert saver.latest() == new  # the pointer, not the sort order, decides


def test_latest_with_and_without_pointer(any_dir: str) -> None:
    saver = Checkpointer(any_dir, keep=5)
    assert saver.latest() is None  # directory does not even exist yet
    saver.save({"a": 1}, epoch=1, step=50)
    second = saver.save({"a": 2}, epoch=2, step=100)
    fs, path = fsspec.core.url_to_fs(any_dir)
    assert fs.cat_file(f"{path}/latest").decode().strip() == "ckpt-e0002-s00000100.pt"
    assert saver.latest() == second

    fs.rm(f"{path}/latest")
    assert saver.latest() == second  # falls back to listing

    fs.pipe_file(f"{path}/latest", b"ckpt-e0009-s00000900.pt\n")  # stale: names a deleted file
    assert saver.latest() == second
    fs.pipe_file(f"{path}/latest", b"../../etc/passwd\n")  # garbage never escapes the directory
    assert saver.latest() == second


def test_listing_sorts_numerically_past_padding(any_dir: str) -> None:
    saver = Checkpointer(any_dir, keep=3)
    saver.save({}, epoch=9999, step=1)
    big = saver.save({}, epoch=10000, step=2)
    fs, path = fsspec.core.url_to_fs(any_dir)
    fs.rm(f"{path}/latest")
    assert saver.latest() == big


def test_checkpointer_rejects_bad_keep() -> None:
    with pytest.raises(ValueError, match="^keep must be >= 1"):
        Checkpointer("memory://x", keep=0)


# ------------------------------------------------------------------------------------------------ unsafe files


def test_custom_pickled_object_is_refused(any_dir: str) -> None:
    url = f"{any_dir}/evil.pt"
    save_state(url, {"model": {}, "extra": _Custom()})  # torch.save itself happily pickles it
    with pytest.raises(CheckpointError) as info:
        load_state(url)
    message = str(info.value)
    assert "\n" not in message
    assert "not a sparsetrain checkpoint" in message and "unsafe" in message and "_Custom" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("content", [b"", b"definitely not a checkpoint", b"PK\x03\x04truncated"])
def test_garbage_files_are_refused(any_dir: str, content: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(any_dir)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/bad.pt", content)
    with pytest.raises(CheckpointError, match="not a sparsetrain checkpoint") as info:
        load_state(f"{any_dir}/bad.pt")
    assert "\n" not in str(info.value)


def test_non_dict_payload_is_refused(any_dir: str) -> None:
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    fs, path = fsspec.core.url_to_fs(any_dir)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/list.pt", buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a dict"):
        load_state(f"{any_dir}/list.pt")


def test_truncated_real_checkpoint_is_refused(any_dir: str) -> None:
    save_state(f"{any_dir}/full.pt", _rich_state())
    fs, path = fsspec.core.url_to_fs(any_dir)
    data = fs.cat_file(f"{path}/full.pt")
    fs.pipe_file(f"{path}/cut.pt", data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a sparsetrain checkpoint"):
        load_state(f"{any_dir}/cut.pt")


# ------------------------------------------------------------------------------------------------ resume


def test_resolve_resume_cases(memory_dir: str) -> None:
    run_dir = f"{memory_dir}/run"
    ckpt_dir = f"{run_dir}/checkpoints"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(f"{memory_dir}/nowhere", ckpt_dir)
    assert resolve_resume("auto", ckpt_dir) is None  # fresh run: nothing to resume, start from scratch

    saver = Checkpointer(ckpt_dir, keep=3)
    first = saver.save({"e": 1}, epoch=1, step=10)
    last = saver.save({"e": 2}, epoch=2, step=20)
    assert resolve_resume("auto", ckpt_dir) == last
    assert resolve_resume("auto", run_dir) == last  # given the run directory instead
    assert resolve_resume(ckpt_dir, "unused") == last  # checkpoint directory
    assert resolve_resume(run_dir, "unused") == last  # run directory containing checkpoints/
    assert resolve_resume(first, "unused") == first  # a file is itself


def test_resolve_resume_empty_directory_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        resolve_resume(str(tmp_path / "run"), str(tmp_path))
    message = str(info.value)
    assert message.startswith("resume: no checkpoint in") and "\n" not in message


def test_resolve_resume_local_file_and_dir(tmp_path: Path) -> None:
    saver = Checkpointer(str(tmp_path / "checkpoints"))
    url = saver.save({"x": 1}, epoch=0, step=0)
    assert resolve_resume(str(tmp_path), "unused") == url
    assert resolve_resume(url, "unused") == url
    assert load_state(resolve_resume("auto", str(tmp_path / "checkpoints")))["x"] == 1


# ------------------------------------------------------------------------------------------------ RNG


def _draw() -> tuple[torch.Tensor, np.ndarray, list[float], list[float]]:
    """One draw from every global RNG, including numpy's and python's cached-gaussian paths."""
    return (torch.rand(8), np.random.standard_normal(5), [random.random() for _ in range(3)],
            [random.gauss(0.0, 1.0) for _ in range(3)])


def test_rng_round_trip_through_checkpoint(any_dir: str) -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    _draw()
    np.random.standard_normal(1)  # leave a cached gaussian in numpy's legacy state
    random.gauss(0.0, 1.0)  # and in python's
    save_state(f"{any_dir}/rng.pt", {"rng": capture_rng()})
    expected = _draw()

    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    _draw()
    restore_rng(load_state(f"{any_dir}/rng.pt")["rng"])
    got = _draw()
    assert torch.equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]


def test_rng_state_uses_only_weights_only_safe_types() -> None:
    def check(value: object) -> None:
        assert not isinstance(value, (np.ndarray, np.generic, tuple)), type(value)
        if isinstance(value, dict):
            for item in value.values():
                check(item)
        elif isinstance(value, list):
            for item in value:
                check(item)

    state = capture_rng()
    check(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

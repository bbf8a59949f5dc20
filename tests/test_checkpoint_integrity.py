"""Checkpoint integrity: checksum sidecars verified on load, resume=auto walking back past damaged files, leftovers of
interrupted writes cleaned at start, unsafe pickles named as such, and what rotation never deletes."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from engine import checkpoint as ckpt
from engine.checkpoint import Checkpointer, CheckpointError, load_state, resolve_resume, save_state, verify_checkpoint
from engine.config import ConfigError
from engine.run_config import load_config


@pytest.fixture(params=["memory", "local"])
def any_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every test runs on an in-memory URL and on a real local directory."""
    if request.param == "local":
        yield str(tmp_path / "ckpts")
        return
    url = f"memory://integrity-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url.removeprefix("memory://")):
        fs.rm(url.removeprefix("memory://"), recursive=True)


def _read(url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path)


def _write(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(data)


def _flip_tensor_byte(url: str, marker: bytes) -> None:
    """Flip one byte inside the stored bytes of a tensor (found by its content), leaving the archive well formed."""
    data = bytearray(_read(url))
    at = bytes(data).index(marker)
    data[at] ^= 0x01
    _write(url, bytes(data))


def _state(value: float) -> dict:
    """A small state whose optimizer tensor is recognisable in the file's bytes."""
    return {"model": {"w": torch.full((64,), value)},
            "optimizer": {"state": {0: {"exp_avg": torch.arange(64, dtype=torch.float32) + value}}}}


# ------------------------------------------------------------------------------------------------ checksums


def test_sidecar_holds_sha256_length_and_finiteness(any_dir: str) -> None:
    url = f"{any_dir}/a.pt"
    meta = save_state(url, _state(1.0), metric=0.5)
    on_disk = json.loads(_read(url + ckpt.META_SUFFIX))
    assert on_disk == meta
    import hashlib
    data = _read(url)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)
    assert meta["finite"] is True and meta["metric"] == 0.5
    assert save_state(f"{any_dir}/b.pt", _state(float("nan")))["finite"] is False


def test_flipped_byte_in_optimizer_state_is_refused(any_dir: str) -> None:
    url = f"{any_dir}/a.pt"
    save_state(url, _state(3.0))
    marker = (torch.arange(64, dtype=torch.float32) + 3.0).numpy().tobytes()[40:48]
    _flip_tensor_byte(url, marker)
    with pytest.raises(CheckpointError) as info:
        load_state(url)
    message = str(info.value)
    assert "\n" not in message and "SHA-256 does not match" in message and url in message
    assert verify_checkpoint(url) is not None


def test_truncated_file_is_refused_in_one_line(any_dir: str) -> None:
    url = f"{any_dir}/a.pt"
    meta = save_state(url, _state(1.0))
    _write(url, _read(url)[: meta["bytes"] // 2])
    with pytest.raises(CheckpointError, match=rf"holds {meta['bytes'] // 2} bytes, its checksum file says "
                                              rf"{meta['bytes']}") as info:
        load_state(url)
    assert "\n" not in str(info.value)


def test_damaged_sidecar_is_refused(any_dir: str) -> None:
    url = f"{any_dir}/a.pt"
    save_state(url, _state(1.0))
    _write(url + ckpt.META_SUFFIX, b"{not json")
    with pytest.raises(CheckpointError, match="checksum file is damaged"):
        load_state(url)


def test_file_without_sidecar_loads_with_a_note_and_is_crc_checked(any_dir: str) -> None:
    """Checkpoints written before checksums: the zip's own CRC32s still catch a flipped byte."""
    url = f"{any_dir}/old.pt"
    buffer = io.BytesIO()
    torch.save(_state(2.0), buffer)
    _write(url, buffer.getvalue())
    notes: list[str] = []
    assert torch.equal(load_state(url, note=notes.append)["model"]["w"], torch.full((64,), 2.0))
    assert len(notes) == 1 and "no checksum file" in notes[0]
    _flip_tensor_byte(url, (torch.arange(64, dtype=torch.float32) + 2.0).numpy().tobytes()[40:48])
    with pytest.raises(CheckpointError, match="fails the CRC32"):
        load_state(url, note=notes.append)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_auto_walks_back_past_damaged_checkpoints(any_dir: str) -> None:
    saver = Checkpointer(any_dir, keep=5)
    urls = [saver.save(_state(float(e)), epoch=e, step=10 * e) for e in (1, 2, 3)]
    _write(urls[2], _read(urls[2])[:100])                  # newest truncated
    _flip_tensor_byte(urls[1], (torch.arange(64, dtype=torch.float32) + 2.0).numpy().tobytes()[40:48])
    notes: list[str] = []
    assert resolve_resume("auto", any_dir, note=notes.append) == urls[0]
    assert [n.split(":")[1].strip() for n in notes] == ["skipping ckpt-e0003-s00000030.pt",
                                                          "skipping ckpt-e0002-s00000020.pt"]
    assert "bytes" in notes[0] and "SHA-256" in notes[1]
    assert resolve_resume(any_dir, "unused", note=notes.append) == urls[0]   # an explicit directory walks back too
    _write(urls[0], b"")
    with pytest.raises(CheckpointError, match="none of the 3 checkpoint") as info:
        resolve_resume("auto", any_dir, note=notes.append)
    assert "\n" not in str(info.value)


def test_resume_auto_after_truncation_resumes_from_the_previous_checkpoint(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """End to end: the newest checkpoint of a run is cut short; resume=auto says so and continues from the one
    before, with the step count of that one."""
    from engine.trainer import train

    small = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[16]",
             "sparsity.method=magnitude", "sparsity.density=0.3", "sparsity.scope=layer", "monitor.progress=false",
             "monitor.tensorboard=false", "train.max_steps_per_epoch=3", f"output_dir={tmp_path}", "name=cut",
             "resume=auto"]
    train(load_config(None, [*small, "train.epochs=2"]))
    directory = tmp_path / "cut" / "checkpoints"
    newest = directory / "ckpt-e0002-s00000006.pt"
    newest.write_bytes(newest.read_bytes()[:-200])
    capsys.readouterr()
    summary = train(load_config(None, [*small, "train.epochs=3"]))
    err = capsys.readouterr().err
    assert "resume: skipping ckpt-e0002-s00000006.pt" in err
    assert summary["epochs"] == 3 and summary["steps"] == 9


# ------------------------------------------------------------------------------------------------ leftovers


def test_clean_temporary_removes_leftovers_only(any_dir: str) -> None:
    saver = Checkpointer(any_dir, keep=3)
    kept = saver.save(_state(1.0), epoch=1, step=1)
    leftovers = [".ckpt-e0002-s00000002.pt.tmp-0123456789ab", ".latest.tmp-abcdef012345",
                 ".ckpt-e0002-s00000002.pt.meta.json.tmp-00000000ffff", "ckpt-e0005-s00000005.pt.meta.json"]
    for name in leftovers:
        _write(f"{any_dir}/{name}", b"")
    _write(f"{any_dir}/.owner", b"run")                    # someone else's marker: not ours to remove
    _write(f"{any_dir}/.notes.tmp-xyz", b"")               # not the pattern _atomic_write uses
    assert saver.clean_temporary() == sorted(leftovers)
    fs, path = fsspec.core.url_to_fs(any_dir)
    left = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    assert left == sorted([".notes.tmp-xyz", ".owner", "ckpt-e0001-s00000001.pt",
                           "ckpt-e0001-s00000001.pt.meta.json", "latest"])
    assert load_state(kept)["model"]["w"][0] == 1.0
    assert saver.clean_temporary() == []


def test_trainer_start_cleans_a_killed_writers_leftovers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine.trainer import train

    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    (directory / ".ckpt-e0001-s00000002.pt.tmp-0123456789ab").write_bytes(b"")
    train(load_config(None, ["data.name=digits", "model.name=mlp", "model.options.hidden=[8]",
                             "sparsity.method=dense", "monitor.progress=false", "monitor.tensorboard=false",
                             "train.epochs=1", "train.max_steps_per_epoch=1", f"output_dir={tmp_path}", "name=run",
                             "resume=auto"]))
    assert not (directory / ".ckpt-e0001-s00000002.pt.tmp-0123456789ab").exists()
    assert "removed .ckpt-e0001-s00000002.pt.tmp-0123456789ab" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ unsafe files


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo unsafe",))


def test_unsafe_pickle_is_reported_as_unsafe_not_corrupt(any_dir: str) -> None:
    """A real pickle that torch.load(weights_only=True) refuses (it would call os.system): named as unsafe, by the
    exception's type, whatever torch's wording of the day."""
    url = f"{any_dir}/evil.pt"
    save_state(url, {"model": {}, "payload": _Evil()})
    with pytest.raises(CheckpointError) as info:
        load_state(url)
    message = str(info.value)
    assert "unsafe to load" in message and "system" in message and "corrupt" not in message
    assert "\n" not in message


@pytest.mark.parametrize("data", [b"", b"hello world, not a checkpoint", b"PK\x03\x04 half a zip"])
def test_garbage_is_refused_in_one_line(any_dir: str, data: bytes) -> None:
    url = f"{any_dir}/junk.pt"
    _write(url, data)
    with pytest.raises(CheckpointError, match="not a sparsetrain checkpoint") as info:
        load_state(url)
    assert "\n" not in str(info.value) and "unsafe" not in str(info.value)


# ------------------------------------------------------------------------------------------------ rotation


def _names(directory: str) -> list[str]:
    return [url.rsplit("/", 1)[-1] for url in Checkpointer(directory).checkpoints()]


def test_rotation_never_deletes_the_newest_finite_checkpoint(any_dir: str) -> None:
    saver = Checkpointer(any_dir, keep=1)
    saver.save(_state(1.0), epoch=1, step=1)
    saver.save(_state(2.0), epoch=2, step=2)
    saver.save(_state(float("nan")), epoch=3, step=3)
    saver.save(_state(float("inf")), epoch=4, step=4)
    assert _names(any_dir) == ["ckpt-e0002-s00000002.pt", "ckpt-e0004-s00000004.pt"]
    saver.save(_state(5.0), epoch=5, step=5)                # finite again: the old one may go now
    assert _names(any_dir) == ["ckpt-e0005-s00000005.pt"]
    fs, path = fsspec.core.url_to_fs(any_dir)
    assert not any(p.endswith(".meta.json") and "e0005" not in p for p in fs.ls(path, detail=False))


def test_keep_best_keeps_the_best_metric_besides_the_newest(any_dir: str) -> None:
    saver = Checkpointer(any_dir, keep=1, keep_best=True)
    for epoch, metric in [(1, 0.5), (2, 0.9), (3, None), (4, 0.7), (5, 0.6)]:
        saver.save(_state(float(epoch)), epoch=epoch, step=epoch, metric=metric)
    assert _names(any_dir) == ["ckpt-e0002-s00000002.pt", "ckpt-e0005-s00000005.pt"]
    assert saver.best() == f"{any_dir}/ckpt-e0002-s00000002.pt"
    saver.save(_state(6.0), epoch=6, step=6, metric=0.9)      # a tie: the newer one is the best now
    assert _names(any_dir) == ["ckpt-e0006-s00000006.pt"]
    plain = Checkpointer(f"{any_dir}/plain", keep=1)
    for epoch, metric in [(1, 0.9), (2, 0.1)]:
        plain.save(_state(float(epoch)), epoch=epoch, step=epoch, metric=metric)
    assert _names(f"{any_dir}/plain") == ["ckpt-e0002-s00000002.pt"]


def test_keep_best_in_a_run_keeps_the_best_evaluated_epoch(tmp_path: Path) -> None:
    """keep=1 with keep_best: the newest checkpoint and the one of the epoch with the best validation accuracy (the
    newest of equals), each with that accuracy in its sidecar."""
    from engine.trainer import train

    seen: dict[int, float] = {}

    class Record:
        def on_epoch_end(self, epoch: int, metrics: dict) -> None:
            seen[epoch + 1] = metrics["val/acc"]

    train(load_config(None, [
        "data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[16]",
        "sparsity.method=magnitude", "sparsity.density=0.3", "sparsity.scope=layer", "monitor.progress=false",
        "monitor.tensorboard=false", "train.max_steps_per_epoch=2", "train.epochs=4", "checkpoint.keep=1",
        "checkpoint.keep_best=true", "data.val_fraction=0.2", "optim.lr=0.05", f"output_dir={tmp_path}",
        "name=best"]), callbacks=[Record()])
    best_epoch = max(seen, key=lambda e: (seen[e], e))
    saver = Checkpointer(str(tmp_path / "best" / "checkpoints"))
    metas = {int(url.rsplit("/", 1)[-1][6:10]): json.loads(Path(url + ckpt.META_SUFFIX).read_text())
             for url in saver.checkpoints()}
    assert set(metas) == {best_epoch, 4}
    for epoch, meta in metas.items():
        assert meta["finite"] is True and meta["metric"] == pytest.approx(seen[epoch])


def test_keep_best_config_is_checked() -> None:
    assert load_config(None, ["checkpoint.keep_best=true"]).checkpoint.keep_best is True
    with pytest.raises(ConfigError, match="keep_best"):
        load_config(None, ["checkpoint.keep_best=2"])


def test_all_finite_sees_nan_and_inf_anywhere_and_nothing_else() -> None:
    from engine.checkpoint import all_finite

    assert all_finite({"model": {"w": torch.ones(3)}, "step": 3, "lr": 0.1, "ids": torch.arange(4), "none": None})
    assert all_finite({"half": torch.full((100_000,), 60_000.0, dtype=torch.float16)})   # sums past fp16's max
    assert all_finite({"bf16": torch.full((10,), 1e30, dtype=torch.bfloat16)})
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite({"opt": {"state": {0: {"m": torch.tensor([1.0, bad, 2.0])}}}})
        assert not all_finite({"list": [torch.zeros(2), torch.tensor([bad], dtype=torch.bfloat16)]})
        assert not all_finite({"best": bad})
    assert not all_finite({"both": torch.tensor([float("inf"), -float("inf")])})   # inf - inf: NaN, still caught

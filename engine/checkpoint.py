"""Checkpoints anywhere fsspec reaches: atomic writes, safe loads, pruning of old files, resume lookup, RNG state.

Files are written by rank 0 only; the caller decides who calls `save_state` / `Checkpointer.save`. Every write goes
to a temporary sibling name first and is then moved into place, so a crash never leaves a truncated file under a
final name. Loads use `torch.load(weights_only=True)` only: a checkpoint is data, never code.

Atomicity by storage: on the local filesystem the move is `os.replace` (atomic on POSIX). Elsewhere it is `fs.mv`;
object stores implement that as copy-then-delete, and since a single object PUT/copy is itself all-or-nothing the
final name still never holds a partial file, though a crash can leave the temporary sibling behind.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "capture_rng",
    "load_state",
    "resolve_resume",
    "restore_rng",
    "save_state",
]

LATEST_POINTER = "latest"
CHECKPOINT_SUBDIR = "checkpoints"
_CKPT_RE = re.compile(r"^ckpt-e(\d{4,})-s(\d{8,})\.pt$")


class CheckpointError(ValueError):
    """A file that is not a loadable sparsetrain checkpoint (corrupt, not torch.save output, or unsafe pickle)."""


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written; `dir=None` means `<run_dir>/checkpoints`."""

    dir: str | None = None
    every_epochs: int = 1
    keep: int = 2
    save_final: bool = True

    def __post_init__(self) -> None:
        """Reject bad values early, before any worker starts, with the field name first."""
        if self.dir is not None and (not isinstance(self.dir, str) or not self.dir.strip()):
            raise ValueError(f"dir must be a non-empty path or fsspec URL, or null for <run_dir>/checkpoints, got {self.dir!r}")
        _require_int_at_least("every_epochs", self.every_epochs, 1)
        _require_int_at_least("keep", self.keep, 1)
        if not isinstance(self.save_final, bool):
            raise ValueError(f"save_final must be true or false, got {self.save_final!r}")


def _require_int_at_least(name: str, value: object, low: int) -> None:
    """Shared range check so every integer field fails the same way (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


# ----------------------------------------------------------------------------------------------------------------
# Storage primitives
# ----------------------------------------------------------------------------------------------------------------


def _join(directory: str, name: str) -> str:
    """Join with '/' while keeping the caller's spelling of the directory (URL or local path)."""
    return f"{directory.rstrip('/')}/{name}"


def _parent(path: str) -> str:
    """Parent of an fsspec path (protocol already stripped)."""
    head, _, _ = path.rstrip("/").rpartition("/")
    return head or "/"


def _write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write bytes to `path` and, locally, fsync them so the later rename cannot expose unflushed data."""
    if isinstance(fs, LocalFileSystem):
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    else:
        with fs.open(path, "wb") as handle:
            handle.write(data)


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself across power loss (POSIX); best effort where directories cannot be opened."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _move(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move into place: os.replace locally (atomic, overwrites), fs.mv elsewhere."""
    if isinstance(fs, LocalFileSystem):
        os.replace(src, dst)
        _fsync_dir(os.path.dirname(dst))
    else:
        fs.mv(src, dst)


def _atomic_write(url: str, data: bytes) -> None:
    """Write to a hidden temporary sibling, then move it over the final name; clean up the sibling on failure."""
    fs, path = url_to_fs(url)
    parent = _parent(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent.rstrip('/')}/.{path.rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        _write_file(fs, tmp, data)
        _move(fs, tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # cleanup must never hide the original error
            pass
        raise


def _read_bytes(url: str) -> bytes:
    """Whole-file read; checkpoints are loaded into memory anyway."""
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def save_state(url: str, state: dict) -> None:
    """Serialise `state` with torch.save and write it atomically to `url`."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _atomic_write(url, buffer.getvalue())


def _is_format_error(error: RuntimeError) -> bool:
    """torch reports a file that is not a torch.save zip archive as a RuntimeError from its stream reader."""
    text = str(error)
    return "PytorchStreamReader" in text or "zip archive" in text or "central directory" in text


def _describe_load_error(error: Exception) -> str:
    """Boil torch's multi-paragraph loader errors down to the one fact a user needs, on one line."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"unsafe to load: it contains a pickled {found.group(1)} object, and only tensors, numbers, "
                "strings, lists and dicts are accepted (weights_only=True)")
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = found.group(1).strip() if found else (text.strip().split(". ")[0].splitlines() or [""])[0]
    detail = detail or type(error).__name__
    return f"empty, truncated, corrupt or not written by torch.save ({detail})"


def load_state(url: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with weights_only=True; anything else (arbitrary pickles, garbage) is refused in one line."""
    data = _read_bytes(url)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not _is_format_error(error):
            raise  # e.g. a CUDA map_location on a CPU-only host: a real error, not a bad file
        raise CheckpointError(f"{url} is not a sparsetrain checkpoint: {_describe_load_error(error)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{url} is not a sparsetrain checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


# ----------------------------------------------------------------------------------------------------------------
# Checkpointer: naming, latest pointer, pruning
# ----------------------------------------------------------------------------------------------------------------


def _ckpt_order(name: str) -> tuple[int, int]:
    """Numeric (epoch, step) key, so ordering survives epochs past 9999."""
    match = _CKPT_RE.match(name)
    assert match is not None
    return int(match.group(1)), int(match.group(2))


class Checkpointer:
    """Writes `ckpt-e{epoch}-s{step}.pt` files into one directory, keeps the newest `keep`, tracks `latest`."""

    def __init__(self, directory: str, keep: int = 2) -> None:
        _require_int_at_least("keep", keep, 1)
        self.directory = directory.rstrip("/") or directory
        self.keep = keep
        self._fs, self._path = url_to_fs(self.directory)

    @staticmethod
    def filename(epoch: int, step: int) -> str:
        """Zero-padded so plain string sorting of a listing is also chronological."""
        if epoch < 0 or step < 0:
            raise ValueError(f"epoch and step must be >= 0, got epoch={epoch}, step={step}")
        return f"ckpt-e{epoch:04d}-s{step:08d}.pt"

    def save(self, state: dict, *, epoch: int, step: int) -> str:
        """Write the checkpoint, then the pointer, then prune: a crash at any point leaves a loadable latest."""
        name = self.filename(epoch, step)
        url = _join(self.directory, name)
        save_state(url, state)
        _atomic_write(_join(self.directory, LATEST_POINTER), (name + "\n").encode())
        self._prune(keep_name=name)
        return url

    def checkpoints(self) -> list[str]:
        """URLs of all checkpoint files in the directory, oldest first by (epoch, step)."""
        return [_join(self.directory, name) for name in self._names()]

    def latest(self) -> str | None:
        """The pointer's target if it exists; otherwise the newest file by name; None for an empty directory."""
        pointed = self._read_pointer()
        if pointed is not None and self._fs.exists(f"{self._path}/{pointed}"):
            return _join(self.directory, pointed)
        names = self._names()
        return _join(self.directory, names[-1]) if names else None

    def _read_pointer(self) -> str | None:
        """The name stored in `latest`, or None when missing or not a checkpoint name (never a path elsewhere)."""
        try:
            text = self._fs.cat_file(f"{self._path}/{LATEST_POINTER}").decode("utf-8", "replace").strip()
        except (FileNotFoundError, IsADirectoryError):
            return None
        return text if _CKPT_RE.match(text) else None

    def _names(self) -> list[str]:
        """Checkpoint basenames present now, sorted by (epoch, step); temporary siblings are ignored."""
        try:
            entries = self._fs.ls(self._path, detail=False)
        except FileNotFoundError:
            return []
        names = {str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries}
        return sorted((n for n in names if _CKPT_RE.match(n)), key=_ckpt_order)

    def _prune(self, keep_name: str) -> None:
        """Delete the oldest files beyond `keep`; the file just written always survives, even if it sorts early."""
        others = [n for n in self._names() if n != keep_name]
        excess = others[: max(0, len(others) - (self.keep - 1))]
        for name in excess:
            self._fs.rm(f"{self._path}/{name}")


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------


def _latest_in(directory: str) -> str | None:
    """Latest checkpoint directly in `directory`, else in its checkpoints/ subdirectory (a run directory)."""
    found = Checkpointer(directory).latest()
    if found is None:
        found = Checkpointer(_join(directory, CHECKPOINT_SUBDIR)).latest()
    return found


def resolve_resume(resume: str, default_dir: str) -> str | None:
    """Turn a `resume` setting into one checkpoint URL.

    "auto" -> the latest checkpoint in `default_dir` (or its checkpoints/), or None when there is none yet, so the
    same command both starts and restarts a preemptible job. Anything else must exist: a checkpoint file -> itself;
    a checkpoint directory -> its latest; a run directory (has checkpoints/) -> that directory's latest. Nothing
    there -> FileNotFoundError with a one-line message.
    """
    if resume == "auto":
        return _latest_in(default_dir)
    fs, path = url_to_fs(resume)
    if fs.isfile(path):
        return resume
    if not fs.isdir(path):
        raise FileNotFoundError(
            f"resume: {resume} does not exist; pass a checkpoint file, a checkpoint directory, a run directory or 'auto'"
        )
    found = _latest_in(resume)
    if found is None:
        raise FileNotFoundError(
            f"resume: no checkpoint in {resume} (looked for ckpt-e*-s*.pt there and in {CHECKPOINT_SUBDIR}/); "
            "pass a checkpoint file, a checkpoint directory or a run directory"
        )
    return found


# ----------------------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------------------


def capture_rng() -> dict:
    """Every global RNG a run draws from, as tensors / ints / floats / lists so weights_only loads accept it."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64).copy()),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": int(py_version), "internal": [int(x) for x in py_internal], "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Put back what capture_rng took; CUDA states restore onto as many devices as are both saved and present."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    np_saved = state["numpy"]
    np.random.set_state({
        "bit_generator": np_saved["bit_generator"],
        "state": {"key": np_saved["key"].cpu().numpy().astype(np.uint32), "pos": int(np_saved["pos"])},
        "has_gauss": int(np_saved["has_gauss"]),
        "gauss": float(np_saved["gauss"]),
    })
    py_saved = state["python"]
    random.setstate((py_saved["version"], tuple(py_saved["internal"]), py_saved["gauss"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for device, rng in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng.cpu(), device)

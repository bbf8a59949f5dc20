"""Checkpoints anywhere fsspec reaches: atomic writes, safe loads, pruning of old files, resume lookup, RNG state.

Files are written by rank 0 only; the caller decides who calls `save_state` / `Checkpointer.save`. Every write goes
to a temporary sibling name first and is then moved into place, so a crash never leaves a truncated file under a
final name. Loads use `torch.load(weights_only=True)` only: a checkpoint is data, never code.

Atomicity by storage: on the local filesystem the move is `os.replace` (atomic on POSIX). Elsewhere it is `fs.mv`;
object stores implement that as copy-then-delete, and since a single object PUT/copy is itself all-or-nothing the
final name still never holds a partial file, though a crash can leave the temporary sibling behind;
``Checkpointer.clean_temporary`` removes such leftovers when the next run starts.

Integrity: every file ``save_state`` writes gets a sidecar ``<file>.meta.json`` (written atomically, after the file)
holding the SHA-256 and length of the file's bytes, whether every tensor in it is finite, and the metric it was saved
with (``checkpoint.keep_best``). ``load_state`` verifies the bytes against it before unpickling anything: a flipped
byte or a truncated file is a one-line CheckpointError, never a silently changed optimizer value. A file without a
sidecar (written before checksums existed, or a crash between the file and its sidecar) is still checked against the
CRC32 of every member that torch's zip archive carries, and loaded with a note. ``resume=auto`` walks back from the
newest checkpoint to the newest one that verifies, naming each it skips and why.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from common.urls import join_url

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "all_finite",
    "capture_rng",
    "load_state",
    "resolve_resume",
    "restore_rng",
    "save_state",
    "verify_checkpoint",
]

LATEST_POINTER = "latest"
CHECKPOINT_SUBDIR = "checkpoints"
_CKPT_RE = re.compile(r"^ckpt-e(\d{4,})-s(\d{8,})\.pt$")
META_SUFFIX = ".meta.json"
META_FORMAT = "sparsetrain-checkpoint-meta/1"
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")    # _atomic_write's temporary siblings

Note = Callable[[str], None]


def _default_note(message: str) -> None:
    """Notes go to stderr, from the main process only (RANK unset or 0), so a multi-rank start prints them once."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


class CheckpointError(ValueError):
    """A file that is not a loadable sparsetrain checkpoint (corrupt, not torch.save output, or unsafe pickle)."""


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written; `dir=None` means `<run_dir>/checkpoints`."""

    dir: str | None = None
    every_epochs: int = 1
    every_steps: int | None = None   # also every N optimizer steps, mid-epoch included (exact mid-epoch resume)
    keep: int = 2
    keep_best: bool = False   # also keep the checkpoint of the best val accuracy (test without a val split)
    save_final: bool = True

    def __post_init__(self) -> None:
        """Reject bad values early, before any worker starts, with the field name first."""
        if self.dir is not None and (not isinstance(self.dir, str) or not self.dir.strip()):
            raise ValueError(f"dir must be a non-empty path or fsspec URL, or null for <run_dir>/checkpoints, got {self.dir!r}")
        _require_int_at_least("every_epochs", self.every_epochs, 1)
        if self.every_steps is not None:
            _require_int_at_least("every_steps", self.every_steps, 1)
        _require_int_at_least("keep", self.keep, 1)
        if not isinstance(self.save_final, bool):
            raise ValueError(f"save_final must be true or false, got {self.save_final!r}")
        if not isinstance(self.keep_best, bool):
            raise ValueError(f"keep_best must be true or false, got {self.keep_best!r}")


def _require_int_at_least(name: str, value: object, low: int) -> None:
    """Shared range check so every integer field fails the same way (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


# ----------------------------------------------------------------------------------------------------------------
# Storage primitives
# ----------------------------------------------------------------------------------------------------------------



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


def all_finite(state: object) -> bool:
    """True when every floating tensor and float in ``state`` (nested dicts, lists, tuples) is finite.

    The gate in front of every checkpoint: a state holding NaN or inf must never replace a good one. Tested by each
    tensor's sum, about ten times cheaper than ``isfinite(t).all()`` on the CPU: a NaN or inf anywhere makes the sum
    NaN or inf. The converse can fail only by overflow, and the sum runs in float32 or wider, which overflows only
    for values near 1e38 / numel (1e31 for a 25M-weight model): a state there has diverged in all but name.
    """
    for value in _leaves(state):
        if torch.is_tensor(value):
            if value.is_floating_point() or value.is_complex():
                wide = value.dtype if value.element_size() >= 4 else torch.float32
                if value.numel() and not bool(torch.isfinite(value.sum(dtype=wide))):
                    return False
        elif isinstance(value, float) and not math.isfinite(value):
            return False
    return True


def _leaves(state: object) -> Iterator[object]:
    """Every non-container value of a nested state, depth first."""
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        else:
            yield value


def _meta_url(url: str) -> str:
    return url + META_SUFFIX


def save_state(url: str, state: dict, *, metric: float | None = None, finite: bool | None = None) -> dict:
    """Serialise ``state`` with torch.save, write it atomically to ``url``, then its checksum sidecar; returns the
    sidecar's content (sha256, bytes, finite, metric). ``finite`` saves the scan when the caller has just checked
    the same state (the trainer's divergence gate); None scans it here."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    meta = {"format": META_FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "finite": all_finite(state) if finite is None else bool(finite),
            "metric": float(metric) if metric is not None and math.isfinite(metric) else None}
    _atomic_write(url, data)
    _atomic_write(_meta_url(url), (json.dumps(meta, allow_nan=False) + "\n").encode())
    return meta


def _read_meta(url: str) -> dict | None:
    """The sidecar of ``url`` as a dict; None when there is none; {} when it exists but is unreadable."""
    fs, path = url_to_fs(_meta_url(url))
    try:
        raw = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("format") == META_FORMAT else {}


def _check_bytes(url: str, data: bytes, meta: dict | None) -> tuple[str | None, bool]:
    """(why ``data`` fails, or None; whether a sidecar vouched for it).

    With a sidecar: length, then SHA-256. Without one: the archive's own CRC32 of every member (torch writes them),
    which catches a truncated or damaged file too, only less strongly than SHA-256.
    """
    if meta == {}:
        return "its checksum file is damaged or not a sparsetrain checksum file", False
    if meta is not None:
        if len(data) != meta.get("bytes"):
            return f"it holds {len(data)} bytes, its checksum file says {meta.get('bytes')} (truncated?)", True
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return "its SHA-256 does not match its checksum file (damaged after it was written)", True
        return None, True
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "empty, truncated, or not a torch.save archive", False
    if damaged is not None:
        return f"member {damaged} fails the CRC32 of the archive (damaged)", False
    return None, False


def verify_checkpoint(url: str) -> str | None:
    """Why the file at ``url`` cannot be trusted (one line), or None when it verifies. Reads the whole file."""
    try:
        data = _read_bytes(url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "it does not exist"
    problem, _ = _check_bytes(url, data, _read_meta(url))
    return problem


def _unsafe_detail(error: pickle.UnpicklingError) -> str:
    """What torch's safe unpickler refused, for the message: the global's name when torch's text names one."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    if found:
        return f"a pickled {found.group(1)}"
    found = re.search(r"function (\S+)", str(error))
    return f"a call of {found.group(1)}" if found else "pickled objects"


def load_state(url: str, map_location: str | torch.device = "cpu", *, note: Note | None = None) -> dict:
    """Verify, then load a checkpoint with weights_only=True; anything else (damaged files, arbitrary pickles,
    garbage) is refused in one line. ``note`` gets the line saying a file without a checksum was loaded.

    Errors are told apart by where they arise, not by torch's wording (which changes between releases): bytes that
    fail their checksum, or that are not an intact zip archive, are damaged; an UnpicklingError from an archive that
    verified means torch's safe loader refused what the pickle holds, i.e. the file is unsafe to load.
    """
    data = _read_bytes(url)
    problem, vouched = _check_bytes(url, data, _read_meta(url))
    if problem is not None:
        raise CheckpointError(f"{url} is not a sparsetrain checkpoint: {problem}")
    if not vouched:
        (note or _default_note)(f"note: {url} has no checksum file ({url.rsplit('/', 1)[-1]}{META_SUFFIX}); "
                                "loaded after checking the archive's own CRC32s")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{url} is not a sparsetrain checkpoint: unsafe to load: it contains "
                              f"{_unsafe_detail(error)}, and only tensors, numbers, strings, lists and dicts are "
                              "accepted (weights_only=True)") from None
    except (EOFError, KeyError, ValueError) as error:   # an intact archive whose pickle is not torch.save's
        raise CheckpointError(f"{url} is not a sparsetrain checkpoint: not written by torch.save "
                              f"({type(error).__name__}: {str(error).strip()[:80]})") from None
    except RuntimeError as error:
        if "PytorchStreamReader" not in str(error):
            raise   # e.g. a CUDA map_location on a CPU-only host: a real error, not a bad file
        raise CheckpointError(f"{url} is not a sparsetrain checkpoint: a zip archive, but not torch.save's "
                              f"({str(error).splitlines()[0][:120]})") from None
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
    """Writes `ckpt-e{epoch}-s{step}.pt` files (each with its checksum sidecar) into one directory, tracks `latest`,
    and keeps the newest `keep`, plus the newest finite one and, with `keep_best`, the best by its metric."""

    def __init__(self, directory: str, keep: int = 2, keep_best: bool = False) -> None:
        _require_int_at_least("keep", keep, 1)
        self.directory = directory.rstrip("/") or directory
        self.keep = keep
        self.keep_best = keep_best
        self._fs, self._path = url_to_fs(self.directory)

    @staticmethod
    def filename(epoch: int, step: int) -> str:
        """Zero-padded so plain string sorting of a listing is also chronological."""
        if epoch < 0 or step < 0:
            raise ValueError(f"epoch and step must be >= 0, got epoch={epoch}, step={step}")
        return f"ckpt-e{epoch:04d}-s{step:08d}.pt"

    def save(self, state: dict, *, epoch: int, step: int, metric: float | None = None,
             finite: bool | None = None) -> str:
        """Write the checkpoint and its sidecar, then the pointer, then prune: a crash at any point leaves a loadable
        latest. ``metric`` (higher is better) ranks it for ``keep_best``; ``finite`` as for ``save_state``."""
        name = self.filename(epoch, step)
        url = join_url(self.directory, name)
        save_state(url, state, metric=metric, finite=finite)
        _atomic_write(join_url(self.directory, LATEST_POINTER), (name + "\n").encode())
        self._prune(keep_name=name)
        return url

    def checkpoints(self) -> list[str]:
        """URLs of all checkpoint files in the directory, oldest first by (epoch, step)."""
        return [join_url(self.directory, name) for name in self._names()]

    def latest(self) -> str | None:
        """The pointer's target if it exists; otherwise the newest file by name; None for an empty directory."""
        pointed = self._read_pointer()
        if pointed is not None and self._fs.exists(f"{self._path}/{pointed}"):
            return join_url(self.directory, pointed)
        names = self._names()
        return join_url(self.directory, names[-1]) if names else None

    def candidates(self) -> list[str]:
        """Checkpoint URLs newest first, the pointer's target leading (it names the last save that completed)."""
        names = self._names()[::-1]
        pointed = self._read_pointer()
        if pointed in names:
            names.remove(pointed)
            names.insert(0, pointed)
        return [join_url(self.directory, name) for name in names]

    def newest_verified(self, note: Note | None = None) -> str | None:
        """The newest checkpoint whose bytes verify (``candidates`` order), saying through ``note`` which newer ones
        it skipped and why; None for a directory without checkpoints. Every checkpoint failing is a CheckpointError:
        starting from scratch over a damaged run would silently throw its training away."""
        say = note or _default_note
        skipped = []
        for url in self.candidates():
            problem = verify_checkpoint(url)
            if problem is None:
                return url
            name = url.rsplit("/", 1)[-1]
            skipped.append(f"{name}: {problem}")
            say(f"resume: skipping {name}: {problem}")
        if skipped:
            raise CheckpointError(f"resume: none of the {len(skipped)} checkpoint(s) in {self.directory} verifies "
                                  f"({'; '.join(skipped[:3])}); pass resume=<a good checkpoint file>, or move the "
                                  "directory away to start afresh")
        return None

    def clean_temporary(self) -> list[str]:
        """Remove what interrupted writes left here: temporary siblings (``.<name>.tmp-<hex>``) and sidecars whose
        checkpoint is gone. Call once at start, from the one process that writes here. Returns the removed names."""
        try:
            entries = self._fs.ls(self._path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = {str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries}
        stale = sorted(n for n in names if _TMP_RE.match(n)
                       or (n.endswith(META_SUFFIX) and _CKPT_RE.match(n[:-len(META_SUFFIX)])
                           and n[:-len(META_SUFFIX)] not in names))
        for name in stale:
            self._fs.rm(f"{self._path}/{name}")
        return stale

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
        """Delete the oldest files beyond `keep`, with their sidecars. Never deleted: the file just written (even if
        it sorts early), the newest file whose sidecar says it is finite (so a run that went bad keeps its last
        good state, whatever `keep` says), and with `keep_best` the file with the highest metric (the newest of
        equals; files without a metric never compete)."""
        names = self._names()
        others = [n for n in names if n != keep_name]
        excess = others[: max(0, len(others) - (self.keep - 1))]
        if not excess:
            return
        metas = {name: _read_meta(join_url(self.directory, name)) or {} for name in names}
        protected = {next((n for n in reversed(names) if metas[n].get("finite") is True), None)}
        if self.keep_best:
            ranked = [(metas[n]["metric"], i) for i, n in enumerate(names)
                      if isinstance(metas[n].get("metric"), (int, float)) and metas[n].get("finite") is not False]
            if ranked:
                protected.add(names[max(ranked)[1]])
        for name in excess:
            if name in protected:
                continue
            self._fs.rm(f"{self._path}/{name}")
            meta = f"{self._path}/{name}{META_SUFFIX}"
            if self._fs.exists(meta):
                self._fs.rm(meta)

    def best(self) -> str | None:
        """URL of the checkpoint with the highest metric (the newest of equals), or None when none has one."""
        names = self._names()
        ranked = [((_read_meta(join_url(self.directory, n)) or {}).get("metric"), i) for i, n in enumerate(names)]
        ranked = [(m, i) for m, i in ranked if isinstance(m, (int, float))]
        return join_url(self.directory, names[max(ranked)[1]]) if ranked else None


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------


def _latest_in(directory: str, note: Note | None = None) -> str | None:
    """Newest verifying checkpoint directly in `directory`, else in its checkpoints/ subdirectory (a run
    directory)."""
    here = Checkpointer(directory)
    if here.latest() is not None:
        return here.newest_verified(note)
    return Checkpointer(join_url(directory, CHECKPOINT_SUBDIR)).newest_verified(note)


def resolve_resume(resume: str, default_dir: str, note: Note | None = None) -> str | None:
    """Turn a `resume` setting into one checkpoint URL.

    "auto" -> the newest checkpoint in `default_dir` (or its checkpoints/) that verifies, or None when there is none
    yet, so the same command both starts and restarts a preemptible job. Anything else must exist: a checkpoint file
    -> itself (verified when loaded); a checkpoint directory or a run directory (has checkpoints/) -> its newest
    checkpoint that verifies. Skipped files are named through ``note``; a directory whose checkpoints all fail is a
    CheckpointError, nothing there a FileNotFoundError, each with a one-line message.
    """
    if resume == "auto":
        return _latest_in(default_dir, note)
    fs, path = url_to_fs(resume)
    if fs.isfile(path):
        return resume
    if not fs.isdir(path):
        raise FileNotFoundError(
            f"resume: {resume} does not exist; pass a checkpoint file, a checkpoint directory, a run directory or 'auto'"
        )
    found = _latest_in(resume, note)
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

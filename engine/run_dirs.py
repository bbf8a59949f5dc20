"""Who owns a run directory and a checkpoint directory, and when a run may continue another's.

- A new run claims ``<output_dir>/<name>`` (or ``<name>-2``, ``-3``, ...) by creating the marker file ``.run``
  exclusively: ``os.open(O_CREAT | O_EXCL)`` locally, ``fs.open(path, "xb")`` on fsspec file systems that support
  it. Two runs started at the same moment with one name therefore get two directories. A file system without an
  exclusive create falls back to check-then-write, which is only a best effort against a start in the same instant.
- A checkpoint directory belongs to one run: the marker ``.owner`` in it names the run directory that writes there.
  Another run pointing ``checkpoint.dir`` at it is refused, so it can never rotate that run's checkpoints away.
- Resuming compares the checkpoint's config with the new one, key by dotted key. Only the keys in ``SAFE_TO_CHANGE``
  (and ``train.epochs`` when it grows) may differ; anything else is refused in one line naming the keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from common.urls import join_url
from engine.checkpoint import CHECKPOINT_SUBDIR, Checkpointer, resolve_resume

RUN_MARKER = ".run"
OWNER_MARKER = ".owner"

# Keys that only say where files are, how often to write them, or what to log: a resumed run may change them.
SAFE_TO_CHANGE: tuple[str, ...] = (
    "name", "output_dir", "resume", "monitor", "checkpoint.keep", "checkpoint.every_epochs", "checkpoint.every_steps",
    "checkpoint.save_final",
    "checkpoint.dir", "data.root", "data.download", "data.num_workers", "data.pin_memory", "data.persistent_workers",
    "data.prefetch_factor", "checkpoint.keep_best", "train.device", "train.eval_every_epochs",
    # checkpoints are backend-neutral (full model, optimizer and mask state): a run may move between single process,
    # DDP and DeepSpeed ZeRO 0-2, and change its timeout
    "parallel",
)


class RunDirError(ValueError):
    """A run directory or checkpoint directory that this run may not use; the message is one line with the fix."""



def create_exclusive(url: str, text: str) -> bool:
    """Create ``url`` holding ``text`` only if it does not exist yet; False when it already did.

    Atomic locally (O_EXCL) and on fsspec file systems whose ``open`` honours mode "xb" (memory, local, and object
    stores with conditional writes); elsewhere a check-then-write best effort.
    """
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rstrip("/").rsplit("/", 1)[0] or "/", exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as out:
            out.write(text)
        return True
    try:
        with fs.open(path, "xb") as out:
            out.write(text.encode())
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):   # no exclusive mode here: best effort
        if fs.exists(path):
            return False
        with fs.open(path, "wb") as out:
            out.write(text.encode())
        return True


def _read_text(url: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        return fs.cat_file(path).decode("utf-8", "replace").strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _place(url: str) -> tuple[str, str]:
    """One spelling per location: (protocol, path), local paths made absolute and resolved."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, path.rstrip("/")


def claim_new_run_dir(output_dir: str, name: str) -> str:
    """<output_dir>/<name>, or <name>-2, -3... when that is taken (a marker, or an older run's config.yaml)."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    candidate, n = name, 1
    while True:
        taken = fs.exists(join_url(root, candidate) + "/config.yaml")
        if not taken and create_exclusive(join_url(join_url(output_dir, candidate), RUN_MARKER), uuid.uuid4().hex):
            return join_url(output_dir, candidate)
        n += 1
        candidate = f"{name}-{n}"


def adopt_run_dir(run_dir: str) -> None:
    """Mark a directory a run continues in (resume=auto's first start, or a resumed run) as taken."""
    create_exclusive(join_url(run_dir, RUN_MARKER), uuid.uuid4().hex)


def resume_run_dir(url: str) -> str | None:
    """The run directory of a checkpoint under ``<run dir>/checkpoints/``; None for a checkpoint elsewhere (the
    resumed run then claims a new directory of its own)."""
    parent = url.rstrip("/").rsplit("/", 1)[0]
    return parent.rsplit("/", 1)[0] if parent.endswith(f"/{CHECKPOINT_SUBDIR}") else None


def resume_target(resume: str, output_dir: str, name: str, checkpoint_dir: str | None = None,
                  note: Callable[[str], None] | None = None) -> tuple[str | None, str | None]:
    """(checkpoint URL or None, run directory or None) for a ``resume`` setting, without writing anything.

    resume=auto looks in ``checkpoint_dir`` when set, else in <output_dir>/<name>/checkpoints; with no checkpoint yet
    it is (None, <output_dir>/<name>), a fresh start there. The run directory of a checkpoint outside a run's
    checkpoints/ is the one its directory's ``.owner`` names; None means "claim a new one".
    """
    default_run = join_url(output_dir, name)
    url = resolve_resume(resume, checkpoint_dir or join_url(default_run, CHECKPOINT_SUBDIR), note)
    if url is None:
        return None, default_run
    return url, resume_run_dir(url) or _read_text(join_url(url.rstrip("/").rsplit("/", 1)[0], OWNER_MARKER))


def check_checkpoint_dir(checkpoint_dir: str, run_dir: str | None, resume_url: str | None) -> None:
    """Refuse a checkpoint directory that belongs to another run: its ``.owner`` names another run directory, or
    it holds checkpoints without an owner and this run does not resume from one of them. Writes nothing."""
    fs, path = fsspec.core.url_to_fs(checkpoint_dir)
    if fs.exists(join_url(path, RUN_MARKER)) and (run_dir is None or _place(checkpoint_dir) != _place(run_dir)):
        raise RunDirError(f"checkpoint.dir {checkpoint_dir} is the directory of another run; point checkpoint.dir at "
                          "an empty directory, or leave it unset (<run dir>/checkpoints)")
    if run_dir is not None and _place(checkpoint_dir) == _place(join_url(run_dir, CHECKPOINT_SUBDIR)):
        return   # a run's own checkpoints/ is its own, also after the run directory was copied or moved
    owner = _read_text(join_url(checkpoint_dir, OWNER_MARKER))
    if owner is not None:
        if run_dir is None or _place(owner) != _place(run_dir):
            raise RunDirError(f"checkpoint.dir {checkpoint_dir} belongs to run {owner}; point checkpoint.dir at an "
                              "empty directory, or leave it unset (<run dir>/checkpoints)")
        return
    found = Checkpointer(checkpoint_dir).checkpoints()
    inside = resume_url is not None and _place(resume_url.rstrip("/").rsplit("/", 1)[0]) == _place(checkpoint_dir)
    if found and not inside:
        raise RunDirError(f"checkpoint.dir {checkpoint_dir} already holds {len(found)} checkpoint(s) of another run; "
                          "point checkpoint.dir at an empty directory, or leave it unset (<run dir>/checkpoints)")


def claim_checkpoint_dir(checkpoint_dir: str, run_dir: str, resume_url: str | None) -> None:
    """Check, then write the ``.owner`` marker naming ``run_dir`` (exclusively: of two runs racing for one directory,
    the second is refused)."""
    check_checkpoint_dir(checkpoint_dir, run_dir, resume_url)
    if not create_exclusive(join_url(checkpoint_dir, OWNER_MARKER), run_dir):
        check_checkpoint_dir(checkpoint_dir, run_dir, resume_url)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {dotted key: value}; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_TO_CHANGE)


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any], grow_epochs: bool = True) -> list[str]:
    """'key old -> new' for every setting that differs and may not change on resume (``train.epochs`` may grow,
    unless ``grow_epochs`` is False: a finished result reused as it is must have trained as long)."""
    old, now = flatten(saved), flatten(new)
    changes = []
    for key in sorted(set(old) | set(now)):
        before, after = old.get(key, "<unset>"), now.get(key, "<unset>")
        if before == after or _safe(key):
            continue
        if (grow_epochs and key == "train.epochs" and isinstance(before, int) and isinstance(after, int)
                and after >= before):
            continue
        changes.append(f"{key} {before!r} -> {after!r}")
    return changes


def with_defaults(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """A saved config rebuilt by today's schema, so keys added since it was written compare as their defaults; as
    saved when it no longer builds (a difference then shows up key by key)."""
    from engine.config import build, to_dict
    from engine.run_config import RunConfig

    try:
        return to_dict(build(RunConfig, dict(saved)))
    except ValueError:
        return saved


def check_resume_config(url: str, saved: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse to continue a checkpoint under different settings, naming the keys (at most five) and the fix."""
    changes = config_changes(with_defaults(saved), new)
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise RunDirError(f"resume: {url} was trained with other settings ({shown}); resume with the checkpoint's "
                          "values, or start a new run (another name, without resume)")

"""File writing that never leaves a partial file behind, and reading that never runs code."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import IO, Any

import torch

log = logging.getLogger(__name__)

# ``atomic_open``'s temporary names: ``.<target name>.<random>.tmp`` beside the target.
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which
    would briefly give other threads' new files the wrong mode); falls back to set-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_directory(path: str | PathLike) -> None:
    """Make a rename in ``path`` durable (the directory entry, not only the file's data)."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write that appears at ``path`` only when the block succeeds.

    It is a temporary file in the target directory, fsynced, then renamed over ``path`` and the
    directory fsynced: a crash or preemption mid-write leaves the previous file (or none), never a
    truncated one. The file gets the mode a plain ``open`` would give (``0o666 & ~umask``, as
    ``torch.save`` does), so colleagues in the user's group can read checkpoints and reports;
    ``mkstemp`` alone would make it private (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporary files (and sharded-checkpoint staging directories) that a killed write left
    in ``folder``: a ``kill -9`` mid-write leaves ``.<name>.<random>.tmp`` behind, gigabytes for a ViT-L
    checkpoint. Only call it where no writer is active (a run's own checkpoint folder at start).
    Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for path in folder.iterdir():
        if not TEMP_FILE.match(path.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime < older_than_s:
                continue
            size = _size(path)
            if path.is_dir():  # a sharded (FSDP2) checkpoint's staging directory
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
            log.warning("removed %s (%.1f MB), left by an interrupted write", path, size / 2**20)
    return removed


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def atomic_torch_save(obj: Any, path: str | PathLike) -> Path:
    """``torch.save`` through ``atomic_open``."""
    with atomic_open(path) as f:
        torch.save(obj, f)
    return Path(path)


def atomic_write_bytes(path: str | PathLike, data: bytes) -> Path:
    """Write ``data`` through ``atomic_open``."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def load_weights_only(path: str | PathLike, mmap: bool = False) -> Any:
    """``torch.load`` on CPU that can never execute code from the file: tensors and plain Python
    containers only (``weights_only=True``, whatever torch's default or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    say). Every project load of a file goes through this or ``vitreg.models.checkpoint``."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's top-level dict without reading its tensors' data: the file memory-mapped, or the
    ``meta.pt`` of an FSDP2 sharded checkpoint directory. Never executes code from the file."""
    path = Path(path)
    if path.is_dir():
        return load_weights_only(path / "meta.pt")
    return load_weights_only(path, mmap=True)


def checkpoint_step(path: str | Path) -> int:
    """The global step of a checkpoint file or sharded directory, without reading the weights."""
    return int(checkpoint_metadata(path)["global_step"])


def json_ready(obj):
    """``obj`` with NaN and infinities replaced by None (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj

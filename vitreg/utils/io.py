"""File writing that never leaves a partial file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import IO, Any

import torch


@contextlib.contextmanager
def atomic_open(path: str | PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write that appears at ``path`` only when the block succeeds.

    It is a temporary file in the target directory, fsynced, then renamed over ``path``: a crash or
    preemption mid-write leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

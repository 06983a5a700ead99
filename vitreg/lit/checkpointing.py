"""Checkpoints that survive crashes: atomic writes, a rolling set of kept step checkpoints, and a
resume that skips a damaged ``last.ckpt`` for the newest readable one.

Layout under ``<run_dir>/checkpoints/``: ``last.ckpt`` (every ``checkpoint_every_n_steps``) and the
newest ``keep_last_k`` step checkpoints ``step<0000000>.ckpt`` (directories of shards under FSDP2). Every file is written to a hidden
temporary name in the same folder, fsynced and renamed, so a ``kill -9`` or a full disk during a
write leaves the previous file intact.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from vitreg.utils.io import atomic_open

log = logging.getLogger(__name__)

STEP_CHECKPOINT = re.compile(r"^step(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic writes (temporary file + fsync + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


def checkpoint_callback(run_dir: Path, every_n_steps: int, keep_last_k: int) -> ModelCheckpoint:
    """``last.ckpt`` plus the newest ``keep_last_k`` step checkpoints, every ``every_n_steps`` steps."""
    return ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps,
        save_last=True,
        monitor="step",  # "newest k" expressed as Lightning's top-k on the step counter
        mode="max",
        save_top_k=keep_last_k,
    )


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's top-level dict without its tensors' data: the file memory-mapped, or the
    ``meta.pt`` of an FSDP2 sharded checkpoint directory."""
    path = Path(path)
    source = path / "meta.pt" if path.is_dir() else path
    return torch.load(source, map_location="cpu", weights_only=False, mmap=not path.is_dir())


def readable(path: Path) -> str | None:
    """None when ``path`` loads as a checkpoint, else why not. Memory-maps the file, so checking a
    ViT-L checkpoint reads its index, not its gigabytes; a sharded (FSDP2) directory is checked
    through its metadata and shard count."""
    if Path(path).is_dir():
        from vitreg.lit.strategies import sharded_checkpoint_problem

        return sharded_checkpoint_problem(path)
    try:
        ckpt = checkpoint_metadata(path)
    except Exception as err:  # truncated zip, garbage, permissions, ...
        return f"{type(err).__name__}: {err}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a Lightning checkpoint (no state_dict/global_step)"
    return None


def checkpoint_step(path: str | Path) -> int:
    """The global step of a checkpoint file or sharded directory, without reading the weights."""
    return int(checkpoint_metadata(path)["global_step"])


def resume_candidates(checkpoint_dir: Path) -> list[Path]:
    """``last.ckpt`` first, then the kept step checkpoints, newest first."""
    steps = sorted(
        (p for p in checkpoint_dir.glob("step*.ckpt") if STEP_CHECKPOINT.match(p.name)),
        key=lambda p: int(STEP_CHECKPOINT.match(p.name).group(1)),
        reverse=True,
    )
    last = checkpoint_dir / "last.ckpt"
    return ([last] if last.exists() else []) + steps


def newest_good_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The first readable checkpoint of ``resume_candidates``; damaged ones are reported and skipped.
    Raises when checkpoints exist but none is readable (never silently restarts from scratch)."""
    candidates = resume_candidates(checkpoint_dir)
    problems = []
    for path in candidates:
        problem = readable(path)
        if problem is None:
            if problems:
                log.warning("falling back to %s: %s", path, "; ".join(problems))
            return path
        problems.append(f"{path.name} is unreadable ({problem})")
        log.error("checkpoint %s is unreadable (%s); trying an older one", path, problem)
    if candidates:
        raise RuntimeError(
            f"no readable checkpoint in {checkpoint_dir}: {'; '.join(problems)}. Move them away to start "
            "afresh, or pass ckpt_path=<a good checkpoint>."
        )
    return None

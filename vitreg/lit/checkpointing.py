"""Checkpoints that survive crashes and are never trusted blindly: the one owner of checkpoint names,
atomic writes with a checksum, loads that never execute code, and a resume that takes the newest
intact checkpoint by its step.

Layout under ``<run_dir>/checkpoints/``: ``last.ckpt`` (every ``checkpoint_every_n_steps``, and on a
preemption signal or Ctrl-C) and the newest ``keep_last_k`` step checkpoints ``step<0000000>.ckpt``
(directories of shards under FSDP2). Names are never versioned (no ``last-v1.ckpt``): a file of the
same name is replaced. Every file is written to a hidden temporary name in the same folder, fsynced
and renamed, so a ``kill -9`` or a full disk during a write leaves the previous file intact; the
temporary files such a kill leaves are removed when the run starts again.

Each single-file checkpoint stores a CRC32 of its tensor payload (``vitreg_checksum``). Resume reads
every candidate's step from its small metadata, tries them newest first, and skips (with a warning
naming the file) one that is unreadable or whose tensors no longer match their checksum.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from vitreg.lit.strategies import sharded_checkpoint_problem
from vitreg.utils.io import atomic_open, checkpoint_metadata, checkpoint_step, load_weights_only

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
STEP_FILENAME = "step{step:07d}"  # ModelCheckpoint's template: step0001250.ckpt
# Names a run may hold: ours, and the versioned copies (last-v1.ckpt, step...-v1.ckpt) that Lightning
# made before vitreg switched versioning off; those may be the newest state of an older run.
CHECKPOINT_NAME = re.compile(r"^(last|step\d+)(-v\d+)?\.ckpt$")
CHECKSUM_KEY = "vitreg_checksum"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def last_checkpoint_path(run_dir: str | Path) -> Path:
    """Where the periodic ``last.ckpt`` and the preemption / Ctrl-C checkpoint are written."""
    return checkpoint_dir(run_dir) / LAST


# ------------------------------------------------------------------------------------ checksums
def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested checkpoint, in a fixed order (dict order survives save and load)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key != CHECKSUM_KEY:
                yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def payload_checksum(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """CRC32 over the raw bytes of every tensor of ``checkpoint`` (and their dtypes and shapes)."""
    crc, count, nbytes = 0, 0, 0
    for tensor in _tensors(checkpoint):
        flat = tensor.detach().reshape(-1)
        crc = zlib.crc32(f"{flat.dtype}{tuple(tensor.shape)}".encode(), crc)
        if flat.numel():
            data = flat.cpu().contiguous().view(torch.uint8).numpy()
            crc = zlib.crc32(data, crc)
            nbytes += data.nbytes
        count += 1
    return {"algorithm": "crc32", "value": crc, "tensors": count, "bytes": nbytes}


def checksum_problem(checkpoint: dict[str, Any]) -> str | None:
    """None when the stored checksum matches the tensors (or the checkpoint predates checksums)."""
    stored = checkpoint.get(CHECKSUM_KEY)
    if stored is None:
        return None
    actual = payload_checksum(checkpoint)
    if actual["value"] != stored.get("value") or actual["tensors"] != stored.get("tensors"):
        return (
            f"its tensors do not match their checksum (crc32 {actual['value']:#010x} over {actual['tensors']} "
            f"tensors, stored {stored.get('value', 0):#010x} over {stored.get('tensors')}): the file is damaged"
        )
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic writes (temporary file + fsync + rename), a payload
    checksum in every file, and loads that never unpickle code (``weights_only=True`` always)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        checkpoint[CHECKSUM_KEY] = payload_checksum(checkpoint)
        with atomic_open(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # ``weights_only`` is ignored on purpose: a checkpoint file is untrusted input.
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return load_weights_only(path)


def checkpoint_callback(run_dir: Path, every_n_steps: int, keep_last_k: int) -> ModelCheckpoint:
    """``last.ckpt`` plus the newest ``keep_last_k`` step checkpoints, every ``every_n_steps`` steps.
    Version counters are off: a file of the same name (a ``last.ckpt`` written on preemption, a step
    replayed after a crash) is replaced, never shadowed by ``last-v1.ckpt``."""
    return ModelCheckpoint(
        dirpath=str(checkpoint_dir(run_dir)),
        filename=STEP_FILENAME,
        auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps,
        save_last=True,
        monitor="step",  # "newest k" expressed as Lightning's top-k on the step counter
        mode="max",
        save_top_k=keep_last_k,
        enable_version_counter=False,
    )


class FinalCheckpoint(L.Callback):
    """Saves ``last.ckpt`` when training ends at a step no checkpoint holds yet (``max_steps`` off the
    ``checkpoint_every_n_steps`` grid), so the last steps of a finished run are never lost and a
    re-run knows it is finished. Every save, whoever makes it, tells it the step it holds."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = int(checkpoint["global_step"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved_step = trainer.global_step if trainer.ckpt_path else None  # resumed: that state is on disk

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(str(self.path), weights_only=False)  # the full state: resumable


# ------------------------------------------------------------------------------------ reading
def readable(path: Path, verify_checksum: bool = False) -> str | None:
    """None when ``path`` loads as a checkpoint, else why not. Memory-maps the file, so checking a
    ViT-L checkpoint reads its index, not its gigabytes, unless ``verify_checksum`` (then every tensor
    is read once). A sharded (FSDP2) directory is checked through its metadata and shard count."""
    if Path(path).is_dir():
        return sharded_checkpoint_problem(path)
    try:
        ckpt = checkpoint_metadata(path)
    except Exception as err:  # truncated zip, garbage, pickled code, permissions, ...
        return f"{type(err).__name__}: {err}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a Lightning checkpoint (no state_dict/global_step)"
    return checksum_problem_of(path) if verify_checksum else None


def _step_or_problem(path: Path) -> int | str:
    """The checkpoint's step, or why it cannot be read."""
    problem = readable(path)
    return problem if problem is not None else checkpoint_step(path)


def _dated_candidates(folder: Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """``(step, path)`` of the checkpoints in ``folder`` that can be read, newest state first, and the
    problems of those that cannot."""
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)) if folder.is_dir() else []
    dated, problems = [], []
    for path in paths:
        step = _step_or_problem(path)
        if isinstance(step, str):
            problems.append(f"{path.name} is unreadable ({step})")
            log.error("checkpoint %s is unreadable (%s); trying an older one", path, step)
        else:
            dated.append((step, path))
    # by the step stored inside, not by name: a kill between writing step<N>.ckpt and last.ckpt leaves the
    # step file newer; last.ckpt first among equals
    dated.sort(key=lambda sp: (-sp[0], sp[1].name != LAST, sp[1].name))
    return dated, problems


def resume_candidates(folder: Path) -> list[Path]:
    """The readable checkpoints in ``folder``, newest state (by step) first."""
    return [path for _, path in _dated_candidates(folder)[0]]


def newest_good_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint in ``folder`` (by its step) that loads and whose tensors match their
    checksum; damaged ones are reported and skipped. Raises when checkpoints exist but none is intact
    (never silently restarts from scratch). The usual case reads one checkpoint once (its checksum)."""
    dated, problems = _dated_candidates(folder)
    for _, path in dated:
        problem = checksum_problem_of(path)
        if problem is None:
            if problems:
                log.warning("falling back to %s: %s", path, "; ".join(problems))
            return path
        problems.append(f"{path.name} is damaged ({problem})")
        log.error("checkpoint %s is damaged (%s); trying an older one", path, problem)
    if problems:
        raise RuntimeError(
            f"no readable checkpoint in {folder}: {'; '.join(problems)}. Move them away to start "
            "afresh, or pass ckpt_path=<a good checkpoint>."
        )
    return None


def checksum_problem_of(path: Path) -> str | None:
    """None when the checkpoint at ``path`` (a file) matches its stored checksum; sharded directories
    carry none (torch.distributed.checkpoint writes them)."""
    if Path(path).is_dir():
        return None
    try:
        return checksum_problem(checkpoint_metadata(path))
    except Exception as err:  # a tensor whose bytes cannot be read back
        return f"{type(err).__name__}: {err}"

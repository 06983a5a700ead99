"""Exact resume: what a checkpoint needs beyond Lightning's own state to continue a run bit for bit.

Lightning restores weights, optimizer, loops and step counters, and the loss centres are buffers.
Two more pieces of state, per rank, each saved by its owner:

- ``StreamPositions``, owned by the training data module (its ``state_dict``, which Lightning stores
  under the data module's class name): the next buffer index of every logical loader worker and the
  number of batches consumed (which worker serves the next batch), see ``ShardStream``;
- ``ExactResume`` (a callback): the main process's RNG states (torch CPU and CUDA, numpy, Python), which
  drive stochastic depth, and the W&B run id. The RNG states are restored at the first training batch
  after loading, because building the resumed DataLoader consumes torch's RNG and the uninterrupted
  run never built one there.

Ranks are gathered into the one checkpoint file. Resuming with another world size or another
number of loader workers cannot re-split the streams: it fails with a message, unless
``data.exact_resume=false`` (then the streams restart fresh and the run continues inexactly).
Checkpoints written before the data module saved its streams keep them in ``ExactResume``'s entry,
which hands them to the data module.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from vitreg.lit.wandb_logger import ID_FILE
from vitreg.utils.distributed import gather_objects

log = logging.getLogger(__name__)


def collect_rng_states() -> dict[str, Any]:
    """RNG states as tensors and plain Python values, so weights-only loading accepts them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeMismatchError(RuntimeError):
    """The checkpoint's data streams cannot be continued by this run's processes."""


class StreamPositions:
    """Where this rank's training data streams stand, for an exact resume (see the module docstring).

    ``consumed`` is told every training batch; ``state_dict`` gathers every rank's positions (call it on
    every rank); ``load_state_dict`` checks that this run can continue them and sets ``worker_offset``
    and ``start_positions``, the ``ShardStream`` arguments that continue each stream where it stopped.
    """

    def __init__(self, num_workers: int, strict: bool = True) -> None:
        self.workers = max(1, num_workers)
        self.strict = strict
        self.positions: dict[int, int] = {}  # logical worker -> next buffer index
        self.batches = 0  # batches this rank consumed since the run began (across resumes)
        self.worker_offset = 0
        self.start_positions: dict[int, int] = {}

    def consumed(self, batch: Any) -> None:
        """Count a training batch; a batch carrying ``stream_position`` (``CountingCollate``) moves its worker's."""
        position = batch.get("stream_position") if isinstance(batch, dict) else None
        if position is not None:
            _, worker, next_index = (int(v) for v in position)  # Python ints (CountingCollate)
            self.positions[worker] = next_index
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        rank_state = {"positions": dict(self.positions), "batches": self.batches, "workers": self.workers}
        ranks = gather_objects(rank_state)  # every rank saves; rank 0 writes the file with all of them
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any], rank: int, world: int) -> None:
        problem = None
        if state.get("world_size") != world:
            problem = (
                f"the checkpoint was written by {state.get('world_size')} processes and this run has {world}: "
                "each process's data stream position cannot be re-split"
            )
        elif state["ranks"][rank]["workers"] != self.workers:
            problem = (
                f"the checkpoint's streams came from {state['ranks'][rank]['workers']} loader workers per process "
                f"and this run has {self.workers} (data.num_workers)"
            )
        if problem:
            if self.strict:
                raise ResumeMismatchError(
                    f"cannot resume exactly: {problem}. Resume with the same trainer.devices x trainer.num_nodes "
                    "and data.num_workers, or set data.exact_resume=false to continue with fresh data streams."
                )
            log.warning("resuming inexactly (data.exact_resume=false): %s; data streams restart fresh", problem)
            return
        mine = state["ranks"][rank]
        self.positions = {int(k): int(v) for k, v in mine["positions"].items()}
        self.batches = int(mine["batches"])
        self.worker_offset = self.batches % self.workers
        self.start_positions = dict(self.positions)
        log.info("exact resume: %d batches consumed, stream positions %s", self.batches, self.positions)


class ExactResume(L.Callback):
    """Saves and restores every rank's RNG states and the W&B run id; see the module docstring."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self._pending_rng: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:  # the first batch after a resume
            restore_rng_states(self._pending_rng)
            self._pending_rng = None

    def state_dict(self) -> dict[str, Any]:
        ranks = gather_objects({"rng": collect_rng_states()})  # every rank saves; rank 0 writes them all
        id_file = self.run_dir / ID_FILE if self.run_dir else None
        wandb_id = id_file.read_text().strip() if id_file and id_file.exists() else None
        return {"world_size": len(ranks), "ranks": ranks, "wandb_id": wandb_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = self._trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        if "positions" in state["ranks"][rank] and trainer is not None and trainer.datamodule is not None:
            trainer.datamodule.load_state_dict(state)  # an older checkpoint: its stream positions are here
        if state.get("world_size") != world:
            return  # the ranks' RNG states cannot be re-split either (the data module said why)
        self._pending_rng = state["ranks"][rank]["rng"]


def restore_wandb_id(checkpoint: str | Path, run_dir: Path) -> str | None:
    """Put the W&B run id saved in ``checkpoint`` back into ``run_dir`` when the run dir lost it (a
    checkpoint copied elsewhere, or resumed with ``ckpt_path``), so the run continues the same W&B run.
    Memory-maps the checkpoint: only its small callback state is read."""
    id_file = run_dir / ID_FILE
    if id_file.exists():
        return id_file.read_text().strip()
    from vitreg.utils.io import checkpoint_metadata

    ckpt = checkpoint_metadata(checkpoint)
    wandb_id = (ckpt.get("callbacks", {}).get(ExactResume.__qualname__) or {}).get("wandb_id")
    if wandb_id:
        from vitreg.utils.io import atomic_write_bytes

        atomic_write_bytes(id_file, wandb_id.encode())
        log.info("W&B run id %s restored from %s", wandb_id, checkpoint)
    return wandb_id

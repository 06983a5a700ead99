"""TensorBoard for sites without W&B (``logger=tensorboard``): scalars through Lightning's ``TensorBoardLogger``,
and the telemetry's histograms and pictures (the same ``media`` the W&B path gets) as TensorBoard histograms
and images. Event files go to ``<run_dir>/tensorboard/``; a resumed run appends new event files there, and
TensorBoard drops the older files' events from the resumed step on (``purge_step``), as the CSV logger drops
its rows: every step is shown once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

TENSORBOARD_DIR = "tensorboard"


def build_tensorboard_logger(run_dir: str | Path, resume_step: int | None = None) -> TensorBoardLogger:
    """Event files directly in ``<run_dir>/tensorboard`` (no ``version_N`` folders: one run, one directory).
    ``resume_step``: the step of the checkpoint being resumed (events logged from it on before a crash are
    about to be logged again)."""
    return TensorBoardLogger(
        save_dir=str(run_dir), name=TENSORBOARD_DIR, version="", default_hp_metric=False, purge_step=resume_step
    )


def tensorboard_loggers(trainer: Any) -> list[TensorBoardLogger]:
    """The TensorBoardLogger instances among ``trainer.loggers``."""
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, TensorBoardLogger)]


def _histogram_stats(counts: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    """``add_histogram_raw``'s arguments from binned counts (sums from the bin centres: the raw values are gone)."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    used = np.nonzero(counts)[0]
    lo, hi = (edges[used[0]], edges[used[-1] + 1]) if len(used) else (edges[0], edges[-1])
    return {
        "min": float(lo),
        "max": float(hi),
        "num": int(counts.sum()),
        "sum": float((counts * centres).sum()),
        "sum_squares": float((counts * centres**2).sum()),
        "bucket_limits": edges[1:].tolist(),  # TensorBoard's buckets are given by their right edges
        "bucket_counts": counts.tolist(),
    }


def log_tensorboard_media(trainer: Any, media: dict[str, object], step: int) -> None:
    """Write ``media`` (``key -> ("histogram", counts, edges) | ("image", uint8 HxWx3, caption)``, as for W&B)
    to every TensorBoardLogger of ``trainer`` at ``step``. No-op without one and on ranks other than 0."""
    if not getattr(trainer, "is_global_zero", True):
        return
    for logger in tensorboard_loggers(trainer):
        writer = logger.experiment
        for key, value in media.items():
            kind, data, extra = value  # type: ignore[misc]
            if kind == "histogram":
                if int(np.asarray(data).sum()) > 0:  # TensorBoard rejects an empty histogram
                    writer.add_histogram_raw(key, global_step=int(step), **_histogram_stats(data, extra))
            elif kind == "image":
                writer.add_image(key, np.asarray(data), global_step=int(step), dataformats="HWC")
        writer.flush()

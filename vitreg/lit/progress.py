"""Progress for logs that are files (SLURM): one newline-terminated line every N steps, no tqdm bar.

A tqdm bar redraws itself with ``\\r`` twice a step: in a log file that is one ever-growing "line"
(about 100 MB over a ViT-L run) with log records glued into it. ``LineProgress`` replaces the bar
(it is a Lightning ``ProgressBar``, so Lightning adds no other) with a line like DINOv2's MetricLogger:

    step 120/125000  loss 11.0731  lr 2.00e-05  0.512 s/step  62.5 img/s  data 1.2%  mem 12.3 GiB  eta 17:45:39

printed on global rank 0 only.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from vitreg.lit.callbacks import is_logging_step
from vitreg.lit.perf import PerfMonitor
from vitreg.utils.clock import format_duration

MODES = ("auto", "bar", "lines")


def progress_mode(mode: str, stream: TextIO | None = None) -> str:
    """``bar`` or ``lines``: ``auto`` is a bar on a terminal, lines when stdout is a file or a pipe."""
    if mode not in MODES:
        raise ValueError(f"trainer.progress must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def progress_line(step: int, total: int, loss: float | None, lr: float | None, perf: dict[str, float]) -> str:
    """One progress line; a figure not known yet (the first window) reads ``-``."""
    parts = [f"step {step}/{total}"]
    parts.append(f"loss {loss:.4f}" if loss is not None else "loss -")
    parts.append(f"lr {lr:.2e}" if lr is not None else "lr -")
    step_s = perf.get("perf/step_s")
    if step_s:
        parts += [
            f"{step_s:.3f} s/step",
            f"{perf['perf/img_per_s']:.1f} img/s",
            f"data {100 * perf['perf/data_wait_frac']:.1f}%",
        ]
    else:
        parts += ["- s/step", "- img/s", "data -"]
    if "perf/peak_mem_gib" in perf:
        parts.append(f"mem {perf['perf/peak_mem_gib']:.1f} GiB")
    if "perf/mfu" in perf:
        parts.append(f"mfu {100 * perf['perf/mfu']:.1f}%")
    parts.append(f"eta {format_duration(step_s * max(total - step, 0))}" if step_s else "eta -")
    return "  ".join(parts)


def current_lr(trainer: L.Trainer) -> float | None:
    """The schedule's learning rate: the largest group lr (layer-wise decay only scales groups down)."""
    if not trainer.optimizers:
        return None
    return max(float(group["lr"]) for group in trainer.optimizers[0].param_groups)


def logged_loss(trainer: L.Trainer) -> float | None:
    """This step's ``train/loss`` (a device tensor: read on logging steps only, where Lightning reads
    its metrics anyway); None on a skipped step."""
    loss = trainer.callback_metrics.get("train/loss")
    return float(loss) if loss is not None else None


class LineProgress(ProgressBar):
    """Prints ``progress_line`` on global rank 0 at each step Lightning logs (every
    ``trainer.log_every_n_steps``). Speed figures come from ``perf`` (the run's ``PerfMonitor``)."""

    def __init__(self, perf: PerfMonitor, stream: TextIO | None = None) -> None:
        super().__init__()
        self.perf = perf
        self.stream = stream  # None: sys.stdout at print time (pytest's capsys swaps it)
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self.stream or sys.stdout, flush=True, **kwargs)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled or not trainer.is_global_zero or not is_logging_step(trainer):
            return
        perf = self.perf.read(trainer)
        total = trainer.max_steps if trainer.max_steps > 0 else 0
        self.print(progress_line(trainer.global_step, total, logged_loss(trainer), current_lr(trainer), perf))

"""Training speed as users see it: ``perf/*`` metrics every ``trainer.log_every_n_steps`` steps.

Measured without stalling the device: every step is bracketed by two time marks (CUDA events on the
device's timeline, ``time.perf_counter`` on CPU) that cost no host sync. Marks are read only on logging
steps, and only those of the steps *before* the current one, so the read waits at most for the
previous step to finish on the device, never for the step just queued.

A window runs from the end of the step before it to the end of its last step, so windows tile the run:
- ``perf/step_s``: the window's wall time / its steps;
- ``perf/img_per_s`` (all devices) and ``perf/img_per_s_per_device``;
- ``perf/data_wait_frac``: the part of the window spent between steps (end of one, start of the next):
  waiting for the next batch and its copy to the device, plus whatever runs between steps (a
  checkpoint save, an online probe). On CUDA this is the device's idle time: a loader that keeps
  ahead of the GPU costs nothing even while the host waits;
- ``perf/peak_mem_gib``: peak CUDA memory allocated since the start (CPU: the process's peak RSS);
- ``perf/mfu``: model FLOP/s utilisation: images/s per device × FLOPs of one image's training step
  (counted once at the start on fake tensors, ``vitreg.lit.flops``; teacher forward included, drop path's
  batch subsets as computed) / the device's dense bf16 peak. Logged on the devices listed below, or on any
  device given ``trainer.peak_tflops``.
The first step (compilation, allocator warm-up) is left out of the first window.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from vitreg.lit.callbacks import is_logging_step

log = logging.getLogger(__name__)

GIB = 2**30

# Dense bf16 peak FLOP/s (no sparsity) by CUDA device name; MFU is left out on devices not listed.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "H800": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPU, a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the start: CUDA's caching allocator on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB  # an allocator counter: no device sync
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB  # bytes on macOS, KiB on Linux


class Clock:
    """Time marks that cost no host sync: CUDA events on a GPU, ``perf_counter`` floats on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wait(self, mark: Any) -> None:
        if self.cuda:
            mark.synchronize()  # the previous step's end: done, or nearly, by the time we ask

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


class PerfMonitor(L.Callback):
    """Logs the ``perf/*`` metrics (module docstring) to every logger, on global rank 0 only.

    ``images_per_step``: images per device per step (the global crops' batch). ``flops_per_image``:
    FLOPs of one image's training step (forward, backward, teacher), or a function that counts them, called
    once at the start and only when the device's peak is known; with both, ``perf/mfu`` is logged too.
    ``peak_flops_override``: the device's peak FLOP/s, for devices not in ``PEAK_BF16_FLOPS``."""

    def __init__(
        self,
        images_per_step: int,
        flops_per_image: float | Callable[[], float] | None = None,
        peak_flops_override: float | None = None,
    ) -> None:
        self.images_per_step = images_per_step
        self.flops_per_image = flops_per_image  # as given: a figure, or the function that counts it
        self._flops: float | None = None  # the figure perf/mfu uses, once known
        self.peak_flops_override = peak_flops_override
        self.latest: dict[str, float] = {}  # the last window's metrics (the progress lines print them)
        self._clock: Clock | None = None
        self._device = torch.device("cpu")
        self._peak_flops: float | None = None
        self._before: Any = None  # the end mark of the step before the open window
        self._steps: list[list[Any]] = []  # [start, end] marks of the steps not read yet
        self._read_at = -1  # global_step of the last read: read once per step, whoever asks first

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = trainer.strategy.root_device
        self._clock = Clock(self._device)
        self._peak_flops = self.peak_flops_override or peak_flops(self._device)
        self._before, self._steps, self._read_at = None, [], -1
        if self._peak_flops and self._flops is None and self.flops_per_image is not None and trainer.is_global_zero:
            self._flops = self._count_flops(self.flops_per_image)

    @staticmethod
    def _count_flops(given: float | Callable[[], float]) -> float | None:
        if not callable(given):
            return float(given)
        try:
            flops = float(given())
        except Exception as error:  # a metric must never stop a run
            log.warning("perf/mfu is off: counting the step's FLOPs failed (%s: %s)", type(error).__name__, error)
            return None
        log.info("perf/mfu: %.4g TFLOP per image per training step (teacher included)", flops / 1e12)
        return flops

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._clock is not None and trainer.is_global_zero:
            self._steps.append([self._clock.mark(), None])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._clock is None or not trainer.is_global_zero or not self._steps:
            return
        self._steps[-1][1] = self._clock.mark()
        if not is_logging_step(trainer):
            return
        metrics = self.read(trainer)
        if metrics:
            # through the module, so Lightning writes them in the same row (CSV) and at the same step as the
            # losses; as CPU tensors, which Lightning keeps where they are (a Python number would be copied
            # to the training device, and read back by the logger)
            cpu = {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}
            pl_module.log_dict(cpu, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)

    def read(self, trainer: L.Trainer) -> dict[str, float]:
        """The window's metrics (empty when it holds no step yet); closes the window. Call on logging
        steps only: it waits for the previous step to finish on the device."""
        if trainer.global_step == self._read_at:
            return self.latest
        self._read_at = trainer.global_step
        assert self._clock is not None
        clock = self._clock
        done = [s for s in self._steps[:-1] if s[1] is not None]  # the current step stays for the next window
        self._steps = self._steps[-1:]
        if self._before is None and done:
            self._before = done.pop(0)[1]  # the first step only opens the first window
        if not done:
            return {}
        clock.wait(done[-1][1])
        total = clock.seconds(self._before, done[-1][1])
        between, previous_end = 0.0, self._before
        for start, end in done:
            between += clock.seconds(previous_end, start)
            previous_end = end
        self._before = done[-1][1]
        step_s = total / len(done)
        per_device = self.images_per_step / step_s if step_s > 0 else 0.0
        metrics = {
            "perf/step_s": step_s,
            "perf/img_per_s": per_device * trainer.world_size,
            "perf/img_per_s_per_device": per_device,
            "perf/data_wait_frac": min(max(between / total, 0.0), 1.0) if total > 0 else 0.0,
            "perf/peak_mem_gib": peak_memory_gib(self._device),
        }
        if self._flops and self._peak_flops:
            metrics["perf/mfu"] = per_device * self._flops / self._peak_flops
        self.latest = metrics
        return metrics

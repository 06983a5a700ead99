"""Progress of the long loops of ``train/analyze.py``: feature extraction, the linear grid's training, LOST's
images, the token probes.

On a terminal a tqdm bar; otherwise (a SLURM log, a pipe) newline-terminated lines, as the training loop's
``vitreg.lit.progress.LineProgress``: one at every further 10 % of the loop and at least every
``min_interval_s`` seconds, then one when it ends::

    knn features (train): 1200/5000 batches  24%  35.1 batches/s  eta 0:01:48
    knn features (train): 5000/5000 batches  100%  34.8 batches/s  done in 0:02:24

Global rank 0 only. Off unless the caller turns it on (``set_progress``: ``train/analyze.py`` does, from
``progress=``), so library calls and the online probes of a training run stay quiet.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

from vitreg.utils.clock import format_duration
from vitreg.utils.distributed import rank_and_world

MODES = ("off", "auto", "bar", "lines")
LINES_PER_LOOP = 10  # a line at every further 10 % of a loop of known length
_mode = "off"

T = TypeVar("T")


def set_progress(mode: str) -> None:
    """The progress of every later loop: ``off``, ``auto`` (a bar on a terminal, lines otherwise), ``bar``
    or ``lines``."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_progress() -> str:
    return _mode


def _resolve(mode: str, stream: TextIO) -> str:
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class TaskProgress:
    """Counts ``update(n)`` calls of one loop and reports them (see the module docstring). ``total``: the
    loop's length, None when unknown (a stream of shards); ``mode``: None for ``set_progress``'s."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "batches",
        *,
        mode: str | None = None,
        stream: TextIO | None = None,
        min_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream
        self.min_interval_s = min_interval_s
        self.clock = clock
        mode = _mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"progress must be one of {MODES}, got {mode!r}")
        self.mode = "off" if rank_and_world()[0] != 0 else _resolve(mode, stream or sys.stdout)
        self.done = 0
        self.start = clock()
        self._last_line = self.start
        self._next_line = 1  # the next line is due at _next_line / LINES_PER_LOOP of the loop
        self._bar = None
        self._closed = False
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=stream or sys.stderr, dynamic_ncols=True)

    def line(self, final: bool = False) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [
            f"{self.desc}: {self.done}/{self.total} {self.unit}"
            if self.total
            else f"{self.desc}: {self.done} {self.unit}"
        ]
        if self.total:
            parts.append(f"{100 * self.done / self.total:.0f}%")
        parts.append(f"{rate:.1f} {self.unit}/s")
        if final:
            parts.append(f"done in {format_duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"eta {format_duration((self.total - self.done) / rate)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        return "  ".join(parts)

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self.mode != "lines" or (self.total and self.done >= self.total):
            return  # close() prints the last line
        now = self.clock()
        due = now - self._last_line >= self.min_interval_s
        if self.total and self.done * LINES_PER_LOOP >= self._next_line * self.total:  # integers: no float drift
            due = True
            while self._next_line * self.total <= self.done * LINES_PER_LOOP:
                self._next_line += 1
        if due:
            self._last_line = now
            self._print(self.line())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines":
            self._print(self.line(final=True))

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "batches", **kwargs: Any) -> Iterator[T]:
    """``items``, reporting progress as they are consumed; ``total`` defaults to ``len(items)`` when it has one."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:  # an iterable stream (shards): progress without a percentage
            total = None
    with TaskProgress(desc, total, unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.update()

"""Durations as every progress line in vitreg writes them (training, evaluation, sweeps)."""

from __future__ import annotations

from datetime import timedelta


def format_duration(seconds: float) -> str:
    """``17:46:40``, or ``2 days, 3:04:05`` past a day (as DINOv2's ETA)."""
    return str(timedelta(seconds=round(seconds)))

"""Figure helpers shared by telemetry and evaluation plots: pyplot-free figures, PNG output, arrays.

Every figure is a ``matplotlib.figure.Figure`` on an Agg canvas made without pyplot, so nothing is
registered in pyplot's global figure list and the process-wide backend is never switched (importing
this in a notebook leaves its inline backend alone). ``save`` and ``figure_to_array`` render a figure
and close it; a figure dropped without either is freed by the garbage collector like any other object.
Import this module only where a figure is made: it imports matplotlib.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitreg.utils.io import atomic_write_bytes

DPI = 100


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A pyplot-free figure (inches) on an Agg canvas, with constrained layout unless ``layout=None``."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def close(fig: Figure) -> None:
    """Release ``fig``: unregister it from pyplot when pyplot made it. Its artists are left to the
    garbage collector: ``fig.clear()`` rebuilds every axis' ticks and cost ~0.5 s per map figure."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


def values(xs: Sequence | None) -> np.ndarray:
    """A record list as floats, with None (JSON's NaN / no value) as NaN."""
    if xs is None:
        return np.zeros(0)
    return np.array([math.nan if x is None else float(x) for x in xs], dtype=float)


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as a uint8 (H, W, 3) array (e.g. for ``wandb.Image``); closes ``fig``."""
    try:
        canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
        canvas.draw()
        return np.array(canvas.buffer_rgba(), dtype=np.uint8)[..., :3].copy()
    finally:
        close(fig)


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to a PNG at ``path`` (through a temporary file and a rename) and close it."""
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
        return atomic_write_bytes(Path(path), buffer.getvalue())
    finally:
        close(fig)

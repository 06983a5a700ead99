"""Artifact analysis of any checkpoint: a vitreg Lightning checkpoint or an official DINOv2 ``.pth``.

``analyze_checkpoint`` builds the backbone the file describes, measures the telemetry statistics on
probe images (a folder, shards, or held-out synthetic images) at one or more resolutions, and writes
a report folder per resolution (``report.json`` + PNG plots, see ``report.write_report``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch

from vitreg.data.probe import image_probe, save_probe, synthetic_probe
from vitreg.models.load import load_backbone
from vitreg.telemetry.measure import measure
from vitreg.telemetry.stats import TelemetrySettings

log = logging.getLogger(__name__)


def analyze_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    images: str | os.PathLike | None = None,
    num_images: int = 64,
    resolutions: list[int] | None = None,
    which: Literal["teacher", "student"] = "teacher",
    settings: TelemetrySettings | None = None,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Measure and write the report; returns ``{"reports": {resolution: report paths}, ...}``.

    ``resolutions`` defaults to the training resolution (224 for official checkpoints); images
    default to ``num_images`` held-out synthetic images (an honest fallback, but artifacts are a
    property of natural images: pass a folder or shards of real photos)."""
    from vitreg.telemetry.report import write_report

    settings = settings or TelemetrySettings()
    loaded = load_backbone(checkpoint, which)
    patch = loaded.model.patch_size
    resolutions = sorted(set(resolutions or [loaded.train_resolution]))
    for res in resolutions:
        if res % patch:
            raise ValueError(f"resolution {res} is not a multiple of the checkpoint's patch size {patch}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    size = max(resolutions)
    if images is None:
        probe = synthetic_probe(num_images, image_size=size, seed=seed, size=size)
    else:
        probe = image_probe(images, num_images, size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_probe(probe, out / "probe_images.npz")
    name = Path(checkpoint).name
    summary: dict = {"checkpoint": str(checkpoint), "source": loaded.source, "step": loaded.step, "reports": {}}
    for res in resolutions:
        record, maps = measure(model, probe, res, settings, device=device)
        record.update(step=loaded.step, model=which, checkpoint=str(checkpoint))  # step: None for official weights
        target = out if len(resolutions) == 1 else out / f"r{res}"
        summary["reports"][res] = write_report(target, record, maps, probe, name=f"{name} @ {res}px")
        log.info("report for %s at %dpx: %s", name, res, target)
    return summary

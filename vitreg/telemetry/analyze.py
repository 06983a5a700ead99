"""Artifact analysis of any checkpoint: a vitreg Lightning checkpoint or an official DINOv2 ``.pth``.

``analyze_checkpoint`` builds the backbone the file describes, measures the telemetry statistics on
probe images (a folder, shards, or held-out synthetic images) at one or more resolutions, and writes
a report folder per resolution (``report.json`` + PNG plots, see ``report.write_report``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vitreg.models.checkpoint import infer_vit_config, load_backbone_weights
from vitreg.models.config import vit_config_from_mapping
from vitreg.models.formats import read_backbone_source
from vitreg.models.vision_transformer import VisionTransformer
from vitreg.telemetry.measure import measure
from vitreg.telemetry.probe import image_probe, save_probe, synthetic_probe
from vitreg.telemetry.stats import TelemetrySettings

log = logging.getLogger(__name__)


@dataclass
class LoadedBackbone:
    model: VisionTransformer
    source: str  # "vitreg" (a training checkpoint with its config), or weights only: "dinov2", "hf", "timm"
    step: int | None  # the training step of a vitreg checkpoint
    train_resolution: int  # the global crop size it was trained at (224 for official weights)


def load_backbone(
    path: str | os.PathLike, which: Literal["teacher", "student"] = "teacher", **overrides
) -> LoadedBackbone:
    """The backbone of any supported checkpoint, loaded strictly: a file, an FSDP2 sharded checkpoint
    directory, a Hugging Face Dinov2 folder or a timm state dict (``vitreg.models.formats``).

    vitreg checkpoints carry their training config, so the architecture (incl. interpolation
    settings) is rebuilt from it; official files are described by their tensors (DINOv2's
    conventions for register models apply: antialiased interpolation, offset 0), HF and timm
    exports by their format (and ``vitreg_export.json`` when present)."""
    found = read_backbone_source(path, which)
    checkpoint, state = found.checkpoint, found.state
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    cfg = hparams.get("cfg") if isinstance(hparams, dict) else None
    if isinstance(cfg, dict) and "model" in cfg and "augment" in cfg:
        resolution = int(cfg["augment"]["global_crops_size"])
        vit_cfg = vit_config_from_mapping({**cfg["model"], **overrides}, resolution)
        model = VisionTransformer(vit_cfg)
        source, step = "vitreg", checkpoint.get("global_step")
    else:
        model = VisionTransformer(infer_vit_config(state, **{**found.config, **overrides}))
        source, step, resolution = found.format, None, 224
    load_backbone_weights(model, state)
    return LoadedBackbone(model.eval(), source, step, resolution)


def analyze_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    images: str | os.PathLike | None = None,
    num_images: int = 64,
    resolutions: list[int] | None = None,
    which: Literal["teacher", "student"] = "teacher",
    settings: TelemetrySettings | None = None,
    device: str | None = None,
    attention: bool = True,
    chunk_size: int = 16,
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
        record, maps = measure(model, probe, res, settings, device=device, attention=attention, chunk_size=chunk_size)
        record.update(step=loaded.step, model=which, checkpoint=str(checkpoint))  # step: None for official weights
        target = out if len(resolutions) == 1 else out / f"r{res}"
        summary["reports"][res] = write_report(target, record, maps, probe, name=f"{name} @ {res}px")
        log.info("report for %s at %dpx: %s", name, res, target)
    return summary

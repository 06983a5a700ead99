"""Run the telemetry statistics of a backbone on probe images: eval mode, no grad, chunked."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitreg.data.probe import probe_tensor
from vitreg.telemetry.capture import capture, merge_captures
from vitreg.telemetry.stats import TelemetrySettings, compute_statistics


def measure(
    backbone: nn.Module,
    probe_images: Tensor,
    resolution: int,
    settings: TelemetrySettings | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict, dict]:
    """(record, maps) of ``compute_statistics`` for uint8 ``probe_images`` at ``resolution``.

    The backbone is switched to eval mode (no stochastic depth) and restored afterwards. Images go
    through in chunks of ``settings.chunk_size`` so the recomputed attention (B·H·T² floats) stays small.
    """
    settings = settings or TelemetrySettings()
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        parts = []
        for start in range(0, len(probe_images), settings.chunk_size):
            x = probe_tensor(probe_images[start : start + settings.chunk_size], resolution).to(device)
            parts.append(capture(backbone, x, attention=settings.attention))
    finally:
        backbone.train(was_training)
    record, maps = compute_statistics(merge_captures(parts), settings)
    record["resolution"] = resolution
    return record, maps

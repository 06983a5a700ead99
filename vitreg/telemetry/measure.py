"""Run the telemetry statistics of a backbone on probe images: eval mode, no grad, chunked."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from vitreg.data.probe import probe_tensor
from vitreg.telemetry.capture import Capture, capture, merge_captures
from vitreg.telemetry.neurons import register_neuron_record, resolve_highest_block
from vitreg.telemetry.stats import TelemetrySettings, compute_statistics


def measure(
    backbone: nn.Module,
    probe_images: Tensor,
    resolution: int,
    settings: TelemetrySettings | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict, dict]:
    """(record, maps) of ``compute_statistics`` for uint8 ``probe_images`` at ``resolution``, plus
    ``record["register_neurons"]`` when ``settings.register_neurons`` (see ``register_neurons``).

    The backbone is switched to eval mode (no stochastic depth) and restored afterwards. Images go
    through in chunks of ``settings.chunk_size`` so the recomputed attention (B·H·T² floats) stays small.
    """
    settings = settings or TelemetrySettings()
    device = torch.device(device) if device is not None else next(backbone.parameters()).device

    def chunks(images: Tensor = probe_images) -> Iterator[Tensor]:
        for start in range(0, len(images), settings.chunk_size):
            yield probe_tensor(images[start : start + settings.chunk_size], resolution).to(device)

    was_training = backbone.training
    backbone.eval()
    try:
        cap = merge_captures([capture(backbone, x, attention=settings.attention) for x in chunks()])
        record, maps = compute_statistics(cap, settings)
        if settings.register_neurons:
            with torch.autocast(device.type, enabled=False):
                scored = lambda rows: chunks(probe_images[rows])  # noqa: E731
                record["register_neurons"] = register_neurons(backbone, scored, cap, record, settings)
    finally:
        backbone.train(was_training)
    record["resolution"] = resolution
    return record, maps


def register_neurons(
    backbone: nn.Module,
    images: Callable[[Tensor], Iterator[Tensor]],
    cap: Capture,
    record: dict,
    settings: TelemetrySettings,
) -> dict:
    """The register-neuron statistic of one measurement. The outlier positions are the headline detector's
    at block ``neuron_outlier_layer``'s output, from the norms and threshold this measurement already has
    (telemetry layer = block + 1); only the FFN activations need the extra pass."""
    outlier_block = backbone.resolve_block(settings.neuron_outlier_layer, "telemetry.neuron_outlier_layer")
    highest = resolve_highest_block(backbone, settings.neuron_highest_layer, "telemetry.neuron_highest_layer")
    layer = outlier_block + 1
    threshold = record["outliers"][record["detector"]]["threshold"][layer]  # None: the detector found none
    norms = getattr(cap.layers[layer], f"{record['stream']}_norms")[:, cap.layout.patches_slice]
    outliers = norms > threshold if threshold is not None else torch.zeros_like(norms, dtype=torch.bool)
    return register_neuron_record(
        backbone, images, outliers, outlier_block, highest, settings.neuron_top_k, settings.neuron_num_images
    )

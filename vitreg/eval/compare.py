"""The same headline numbers for several versions of one backbone (plain, with test-time registers, under a
replacement ablation, another checkpoint), so ways of removing artifacts are compared on equal terms.

Each metric runs one existing evaluation (``vitreg.eval.runners``) or the telemetry statistics on the model
as it is handed over: a ``TestTimeRegisters`` model, or a backbone inside ``with model.edit(...)``, is measured
exactly as a plain one, on the same images.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitreg.eval.knn import KNNSettings
from vitreg.eval.linear import LinearProtocol
from vitreg.eval.lost import LostSettings
from vitreg.eval.runners import EvalDataConfig, raw_probe_images, run_knn, run_linear, run_local, run_lost
from vitreg.eval.token_probes import OutlierProbeSettings
from vitreg.models.load import LoadedBackbone
from vitreg.telemetry.measure import measure
from vitreg.telemetry.report import summarise
from vitreg.telemetry.stats import TelemetrySettings

# what a comparison can report, in the order of its table
METRICS: tuple[str, ...] = ("telemetry", "knn", "linear", "lost", "local")


@dataclass
class MetricInputs:
    """What the metrics read: the analysis run's sections, its probe images, where files go, the device."""

    images: str | None
    num_images: int
    data: EvalDataConfig
    telemetry: TelemetrySettings
    knn: KNNSettings
    linear: LinearProtocol
    lost: LostSettings
    outliers: OutlierProbeSettings
    device: torch.device
    autocast: torch.dtype | None
    seed: int = 0


def check_metrics(metrics: Sequence[str], key: str) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"{key} must list some of {list(METRICS)}, got {list(metrics)}")
    return [m for m in METRICS if m in metrics]


def raw_probe(loaded: LoadedBackbone, inputs: MetricInputs) -> tuple[torch.Tensor, int]:
    """The uint8 probe images of the label-free metrics, at ``loaded``'s evaluation resolution."""
    return raw_probe_images(loaded, inputs.images, inputs.num_images, inputs.data.resolution, inputs.seed)


def telemetry_numbers(record: dict) -> dict[str, Any]:
    """The artifact numbers of a telemetry record that a comparison reports."""
    s = summarise(record)
    detector = s["detector"]
    return {
        "emergence_layer": s["emergence_layer"].get(detector),
        "patch_outlier_fraction": s["last_patch_outlier_fraction"][detector],
        "patch_norm_p99": s["patch_norm_p99"],
        "patch_norm_max": s["patch_norm_max"],
        "max_median_ratio": s["max_median_ratio"],
        "cls_to_outliers": s["cls_to_outliers"],
        "cls_entropy": s["cls_entropy"],
    }


def headline_numbers(
    loaded: LoadedBackbone, metrics: Sequence[str], inputs: MetricInputs, out_dir: str | os.PathLike
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(numbers, maps): one flat dict of the chosen metrics' headline numbers for ``loaded.model`` as it runs
    now, and the telemetry's per-image maps (last-layer norms, CLS attention) for pictures. Files the
    evaluations write (LOST's generated images, the best linear classifier) go under ``out_dir``."""
    numbers: dict[str, Any] = {}
    maps: dict[str, np.ndarray] = {}
    out = Path(out_dir)
    common = {"device": inputs.device, "seed": inputs.seed}
    if "telemetry" in metrics:
        raw, resolution = raw_probe(loaded, inputs)
        record, maps = measure(loaded.model, raw, resolution, inputs.telemetry, inputs.device)
        numbers.update(telemetry_numbers(record))
    if "knn" in metrics:
        result = run_knn(loaded, inputs.data, inputs.knn, autocast=inputs.autocast, **common)
        numbers["knn_top1"] = result["best"]["top1"]
    if "linear" in metrics:
        cached = dataclasses.replace(inputs.linear, mode="cached")  # features once per version, not per epoch
        result = run_linear(loaded, inputs.data, cached, out, autocast=inputs.autocast, **common)
        numbers["linear_top1"] = result["best"]["top1"]
    if "lost" in metrics:
        quiet = dataclasses.replace(inputs.lost, sweep=False, num_examples=0)
        numbers["lost_corloc"] = run_lost(loaded, quiet, out, **common)["corloc"]
    if "local" in metrics:
        result = run_local(loaded, inputs.images, inputs.num_images, inputs.data, inputs.outliers, out, **common)
        for probe, key in (("position", "top1"), ("reconstruction", "mse")):
            for group in ("normal", "outlier"):
                entry = result[probe][group]
                numbers[f"{probe}_{key}_{group}"] = entry[key] if entry else None
    return numbers, maps

"""A self-contained report of one telemetry measurement: ``report.json`` and the PNGs of ``plots``.

record, maps = measure(backbone, probe_images, 224)
write_report("reports/step1000", record, maps, probe_images, name="vitb R=4")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from vitreg.telemetry import plots
from vitreg.utils.figures import save, values
from vitreg.utils.io import atomic_write_bytes, json_ready

REPORT = "report.json"

LEGEND = {
    "name": "label given to this report",
    "step": "training step of the measurement",
    "model": "teacher or student backbone",
    "resolution": "probe image side in pixels the backbone saw",
    "num_registers": "register tokens of the backbone (0: none)",
    "depth": "transformer blocks; layer l = residual stream after l blocks, 0..depth",
    "stream": "norms the outlier detectors ran on: prenorm = residual stream, postnorm = after the final LayerNorm",
    "detector": "headline outlier detector (fixed = norm > 150, robust_z = median + k·MAD, valley = split of a bimodal log-norm histogram)",
    "emergence_layer": "per detector: first layer whose patch outlier fraction exceeds the emergence fraction (null: never)",
    "has_artifacts": "the headline detector finds high-norm patch tokens at some layer",
    "last_patch_outlier_fraction": "per detector: fraction of patch tokens above the threshold at the last layer",
    "last_register_outlier_fraction": "per detector: fraction of register tokens above the same threshold at the last layer (null without registers)",
    "max_median_ratio": "last layer: largest patch norm / median patch norm (artifacts: >> 1)",
    "peak_max_median_ratio": "the largest max/median patch-norm ratio over layers",
    "peak_max_median_layer": "layer of peak_max_median_ratio",
    "bimodality": "last layer: Sarle's bimodality coefficient of log patch norms (> 0.555 suggests two modes)",
    "patch_norm_p99": "last layer: 99th percentile of patch norms in the detector stream",
    "patch_norm_max": "last layer: largest patch norm in the detector stream",
    "cls_to_outliers": "last block: CLS attention mass on outlier patches (mean over images and heads)",
    "cls_to_registers": "last block: CLS attention mass on registers",
    "cls_to_sink": "last block: CLS attention mass on the attention-bias sink (null without model.attn_bias=kv)",
    "cls_entropy": "last block: normalised entropy (0..1) of CLS attention over patches",
    "registers": "register health at the last layer (null without registers)",
    "registers.identical": "registers collapsed: some pair has mean cosine >= the identical threshold",
    "registers.absorbing": "registers hold the high norms (>= half are outliers) while patches stay clean",
    "registers.cosine_max": "largest mean cosine between two different registers (after the final LayerNorm)",
    "registers.cosine_with_cls_max": "largest mean cosine between a register and CLS",
    "registers.norm_ratio": "per register (or overall): median register norm / median patch norm, last layer, detector stream",
    "registers.norm_ratio_max": "largest register / patch median-norm ratio (>> 1: a register holds high norms)",
    "register_flags": "health flags: identical, absorbing, artifacts_in_patches (patches still have outliers despite registers)",
    "record": "the full telemetry record (see vitreg.telemetry.stats.compute_statistics)",
}


def _last(xs):
    return xs[-1] if xs else None


def _max(x):
    """The largest finite value of a number or a list of numbers (None when there is none)."""
    xs = values(x if isinstance(x, (list, tuple)) else [x])
    return float(np.nanmax(xs)) if xs.size and np.isfinite(xs).any() else None


def _finite_or_none(x):
    return x if x is not None and isinstance(x, (int, float)) and math.isfinite(x) else None


def summarise(record: dict, name: str | None = None) -> dict:
    """The headline numbers of ``record``; ``LEGEND`` says what each means."""
    detector = record["detector"]
    stream = record.get("stream", "prenorm")
    outliers = record["outliers"]
    has_registers = bool(record.get("num_registers"))
    ratios = values(record.get("max_median_ratio"))
    peak_layer = int(np.nanargmax(ratios)) if ratios.size and np.isfinite(ratios).any() else None
    attention = record.get("attention", {})
    last_patch = {d: _last(v["patch_fraction"]) for d, v in outliers.items()}
    summary = {
        "name": name,
        "step": record.get("step"),
        "model": record.get("model"),
        "resolution": record.get("resolution"),
        "num_registers": record.get("num_registers", 0),
        "depth": record.get("depth"),
        "stream": stream,
        "detector": detector,
        "emergence_layer": dict(record.get("emergence_layer", {})),
        "has_artifacts": record.get("emergence_layer", {}).get(detector) is not None,
        "last_patch_outlier_fraction": last_patch,
        "last_register_outlier_fraction": (
            {d: _last(v["register_fraction"]) for d, v in outliers.items()} if has_registers else None
        ),
        "max_median_ratio": _finite_or_none(_last(record.get("max_median_ratio"))),
        "peak_max_median_ratio": _finite_or_none(float(ratios[peak_layer])) if peak_layer is not None else None,
        "peak_max_median_layer": peak_layer,
        "bimodality": _finite_or_none(_last(record.get("bimodality"))),
        "patch_norm_p99": _finite_or_none(_last(record["norms"][stream]["patch"]["p99"])),
        "patch_norm_max": _finite_or_none(_last(record["norms"][stream]["patch"]["max"])),
        "cls_to_outliers": _last(attention.get("cls_to_outliers")),
        "cls_to_registers": _last(attention.get("cls_to_registers")) if has_registers else None,
        "cls_to_sink": _last(attention.get("cls_to_sink")),
        "cls_entropy": _last(attention.get("cls_entropy")),
        "registers": None,
        "register_flags": [],
    }
    health = record.get("registers")
    if health:
        summary["registers"] = {
            "identical": health.get("identical"),
            "absorbing": health.get("absorbing"),
            "cosine_max": health.get("cosine_max"),
            "cosine_with_cls_max": _max(health.get("cosine_with_cls")),
            "norm_ratio": health.get("norm_ratio"),
            "norm_ratio_max": _max(health.get("norm_ratio")),
        }
        flags = [flag for flag in ("identical", "absorbing") if health.get(flag)]
        if summary["has_artifacts"] and (last_patch.get(detector) or 0) > 0:
            flags.append("artifacts_in_patches")
        summary["register_flags"] = flags
    return summary


def write_report(
    out_dir: str | os.PathLike,
    record: dict,
    maps: dict[str, np.ndarray] | None,
    probe_images=None,
    name: str | None = None,
) -> dict:
    """Write ``report.json`` ({"name", "summary", "legend", "record"}) and the PNGs of one
    measurement into ``out_dir``; ``attention_maps.png`` needs ``maps``. Returns
    ``{"json": path, "plots": [paths]}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(record, name)
    legend = {key: LEGEND[key] for key in LEGEND if key.split(".")[0] in summary or key == "record"}
    report = {"name": name, "summary": summary, "legend": legend, "record": record}
    text = json.dumps(json_ready(report), allow_nan=False, indent=1)
    json_path = atomic_write_bytes(out / REPORT, text.encode("utf-8"))

    figures = {
        "norm_histograms.png": lambda: plots.norm_histograms(record, "prenorm"),
        "norm_histograms_postnorm.png": lambda: plots.norm_histograms(record, "postnorm"),
        "layer_quantiles.png": lambda: plots.layer_quantiles(record),
        "outlier_fractions.png": lambda: plots.outlier_fractions(record),
        "position_map.png": lambda: plots.position_map(record),
    }
    if maps and "norm" in maps:
        figures["attention_maps.png"] = lambda: plots.attention_maps(probe_images, maps, record.get("resolution"))
    paths = [save(make(), out / filename) for filename, make in figures.items()]
    return {"json": json_path, "plots": paths}

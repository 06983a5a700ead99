"""The local telemetry files of a run, readable without W&B.

Layout under ``<run_dir>/telemetry/``:

- ``telemetry.jsonl``: one JSON record per (step, model, resolution) from ``compute_statistics``,
  plus ``step``, ``model`` (teacher | student) and ``resolution``;
- ``maps/step<step>_<model>_r<resolution>.npz``: the per-image maps (norms, outliers, attention);
- ``probe_images.npz``: the uint8 probe images the maps refer to.

A run resumed from a checkpoint measures some steps again; readers keep the last record of each
(step, model, resolution).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from vitreg.utils.io import atomic_write_bytes, json_ready

TELEMETRY_DIR = "telemetry"
RECORDS = "telemetry.jsonl"
PROBE_IMAGES = "probe_images.npz"
# Logged as emergence_layer/<detector> while no layer has emerged: a panel needs a value from step 0,
# and no real layer is negative. The JSON records keep null.
NO_EMERGENCE = -1.0


def telemetry_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / TELEMETRY_DIR


MAPS_NAME = re.compile(r"step(?P<step>\d+)_(?P<model>.+)_r(?P<resolution>\d+)\.npz")


def maps_path(root: Path, step: int, model: str, resolution: int) -> Path:
    return root / "maps" / f"step{step:07d}_{model}_r{resolution}.npz"


class TelemetryWriter:
    """Appends records to ``telemetry.jsonl`` (one line, flushed, per measurement) and writes maps."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict, maps: dict[str, np.ndarray] | None = None) -> None:
        with open(self.root / RECORDS, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_ready(record), allow_nan=False, separators=(",", ":")) + "\n")
            f.flush()
        if maps:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **maps)
            path = maps_path(self.root, record["step"], record["model"], record["resolution"])
            atomic_write_bytes(path, buffer.getvalue())


def read_records(run_or_telemetry_dir: str | os.PathLike) -> list[dict]:
    """All records of a run, the last one of each (step, model, resolution), sorted by step.

    A torn last line (a run killed mid-write) is ignored."""
    root = Path(run_or_telemetry_dir)
    path = root / RECORDS if (root / RECORDS).exists() else telemetry_dir(root) / RECORDS
    if not path.exists():
        raise FileNotFoundError(f"no telemetry at {path}; was the run trained with callbacks.telemetry.enabled=true?")
    latest: dict[tuple, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        latest[(record["step"], record["model"], record["resolution"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["model"], r["resolution"]))


def available_maps(root: Path) -> list[tuple[int, str, int]]:
    """(step, model, resolution) of every maps file under ``root`` (a telemetry dir), sorted."""
    found = []
    for path in (root / "maps").glob("step*_*_r*.npz"):
        match = MAPS_NAME.fullmatch(path.name)
        if match:
            found.append((int(match["step"]), match["model"], int(match["resolution"])))
    return sorted(found)


def read_maps(run_or_telemetry_dir: str | os.PathLike, step: int, model: str, resolution: int) -> dict[str, np.ndarray]:
    """The maps measured at (step, model, resolution); a missing one raises FileNotFoundError listing
    what was measured, since the steps depend on the cadence and the end of training."""
    root = Path(run_or_telemetry_dir)
    root = root if (root / "maps").exists() else telemetry_dir(root)
    path = maps_path(root, step, model, resolution)
    if not path.exists():
        have = available_maps(root)
        if not have:
            raise FileNotFoundError(f"no telemetry maps under {root / 'maps'}; was telemetry enabled for this run?")
        steps = sorted({s for s, m, r in have if (m, r) == (model, resolution)})
        others = sorted({(m, r) for _, m, r in have})
        raise FileNotFoundError(
            f"no maps at step {step} for model={model!r}, resolution={resolution} under {root / 'maps'}; "
            f"steps with maps for it: {steps or 'none'}; measured (model, resolution): {others}"
        )
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and (math.isnan(x) or math.isinf(x)))


def scalar_summary(record: dict, prefix: str) -> dict[str, float]:
    """The record's headline numbers as flat scalars for any Lightning logger (CSV, W&B, ...).

    Last-layer norms and outlier fractions of every detector, the emergence layer per detector, the
    headline detector's outlier fraction and p99 norm per layer, last-block attention, register
    health, redundancy, and the register neurons' best ratio, its block and the top-k overlap. The
    emergence layer is ``NO_EMERGENCE`` (-1) while there is none; other missing values (no registers,
    no outliers, no earlier measurement to overlap with) are left out."""
    out: dict[str, float] = {}
    stream = record["stream"]
    norms = record["norms"]
    for name, key in (("prenorm", "patch_norm"), ("postnorm", "patch_norm_post")):
        for q in ("p50", "p99", "max"):
            out[f"{prefix}/last/{key}_{q}"] = norms[name]["patch"][q][-1]
    for detector, values in record["outliers"].items():
        out[f"{prefix}/last/outlier_frac/{detector}"] = values["patch_fraction"][-1]
        if _finite(values["register_fraction"][-1]):
            out[f"{prefix}/last/register_outlier_frac/{detector}"] = values["register_fraction"][-1]
    for detector, layer in record["emergence_layer"].items():
        out[f"{prefix}/emergence_layer/{detector}"] = NO_EMERGENCE if layer is None else float(layer)
    head = record["outliers"][record["detector"]]["patch_fraction"]
    for layer, fraction in enumerate(head):
        out[f"{prefix}/layer{layer:02d}/outlier_frac"] = fraction
        out[f"{prefix}/layer{layer:02d}/patch_norm_p99"] = norms[stream]["patch"]["p99"][layer]
    out[f"{prefix}/last/max_median_ratio"] = record["max_median_ratio"][-1]
    out[f"{prefix}/last/massive_activation_ratio"] = record["massive_activation_ratio"][-1]
    out[f"{prefix}/last/cls_patch_cosine"] = record["cls_patch_cosine"][-1]
    out[f"{prefix}/last/channel_outliers"] = record["channel_outliers"]["count"][-1]
    for key, values in record["attention"].items():
        if _finite(values[-1]):
            out[f"{prefix}/attention/{key}"] = values[-1]
    for key, value in record["redundancy"].items():
        if _finite(value):
            out[f"{prefix}/redundancy/{key}"] = value
    neurons = record.get("register_neurons")
    if neurons:
        if neurons["neurons"]:
            best = neurons["neurons"][0]  # the highest ratio
            out[f"{prefix}/register_neurons/top_ratio"] = best["ratio"]
            out[f"{prefix}/register_neurons/top_score"] = best["score"]
            out[f"{prefix}/register_neurons/top_layer"] = best["layer"]
        if _finite(neurons.get("overlap")):
            out[f"{prefix}/register_neurons/overlap"] = neurons["overlap"]
    registers = record.get("registers")
    if registers:
        for key in ("cosine_max", "cosine_mean", "param_cosine_max"):
            if _finite(registers.get(key)):
                out[f"{prefix}/registers/{key}"] = registers[key]
        out[f"{prefix}/registers/norm_ratio_max"] = max(registers["norm_ratio"])
        out[f"{prefix}/registers/cosine_with_cls_max"] = max(registers["cosine_with_cls"])
        out[f"{prefix}/registers/identical"] = float(registers["identical"])
        out[f"{prefix}/registers/absorbing"] = float(registers["absorbing"])
    return {k: float(v) for k, v in out.items() if _finite(v)}

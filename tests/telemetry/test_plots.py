"""Telemetry pictures and the one-measurement report, on records measured from tiny ViTs."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitreg.data.probe import save_probe, synthetic_probe
from vitreg.models.vision_transformer import build_vit
from vitreg.telemetry import plots
from vitreg.telemetry import report as report_module
from vitreg.telemetry.measure import measure
from vitreg.telemetry.report import LEGEND, write_report
from vitreg.telemetry.store import PROBE_IMAGES, TelemetryWriter, read_maps, read_records, telemetry_dir
from vitreg.utils import figures
from vitreg.utils.io import json_ready

SIZE = 56  # 4 x 4 patches of 14 px


def make_run(run_dir: Path, registers: int, steps=(0, 10), seed: int = 0) -> Path:
    """A run directory with telemetry of a tiny ViT at ``steps`` (weights nudged between steps)."""
    torch.manual_seed(seed)
    model = build_vit("vitt", num_register_tokens=registers, patch_size=14, img_size=SIZE)
    probe = synthetic_probe(6, 64, 0, size=SIZE)
    root = telemetry_dir(run_dir)
    writer = TelemetryWriter(root)
    save_probe(probe, root / PROBE_IMAGES)
    for step in steps:
        record, maps = measure(model, probe, SIZE)
        record.update(step=step, model="teacher")
        writer.write(record, maps)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return run_dir


def with_artifacts(record: dict, first_layer: int = 3) -> dict:
    """``record`` edited as if high-norm patches appeared from ``first_layer`` on (every value the
    plots read, so the non-null code paths render)."""
    r = copy.deepcopy(record)
    detector = r["detector"]
    for layer in range(r["depth"] + 1):
        if layer >= first_layer:
            r["norms"][r["stream"]]["histogram"][layer][40] += 2
            r["outliers"][detector]["threshold"][layer] = 100.0
            r["outliers"][detector]["patch_fraction"][layer] = 0.02
        else:
            r["outliers"][detector]["threshold"][layer] = None
    r["emergence_layer"][detector] = first_layer
    r["position_frequency"][0][1] = 0.5
    return r


_RUNS: dict[str, dict[int, Path]] = {}


def shared_runs(tmp_path_factory) -> dict[int, Path]:
    """Two runs measured once per test session: R=0 at steps 0, 10 and R=4 at steps 0, 5."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _RUNS:
        base = tmp_path_factory.mktemp("telemetry_runs")
        _RUNS[key] = {
            0: make_run(base / "vitt_r0", 0, steps=(0, 10)),
            4: make_run(base / "vitt_r4", 4, steps=(0, 5), seed=1),
        }
    return _RUNS[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    return shared_runs(tmp_path_factory)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


def assert_no_open_figures() -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        assert pyplot.get_fignums() == []


def test_every_plot_renders(runs):
    records = read_records(runs[4])
    last = records[-1]
    maps = read_maps(runs[4], last["step"], "teacher", SIZE)
    probe = synthetic_probe(6, 64, 0, size=SIZE)
    made = {
        "hist": plots.norm_histograms(last),
        "hist_post": plots.norm_histograms(last, "postnorm"),
        "quantiles": plots.layer_quantiles(last),
        "outliers": plots.outlier_fractions(last),
        "positions": plots.position_map(last),
        "attention": plots.attention_maps(probe, maps, SIZE),
        "attention_no_images": plots.attention_maps(None, maps),
        "emergence": plots.emergence_heatmap(records),
    }
    for name, fig in made.items():
        array = figures.figure_to_array(fig)
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, name
        assert 150 <= array.shape[0] <= 2000 and 200 <= array.shape[1] <= 2500, (name, array.shape)
        assert array.std() > 0, name  # something was drawn
    assert_no_open_figures()


def test_attention_rows_and_register_columns(runs):
    last = read_records(runs[4])[-1]
    maps = read_maps(runs[4], last["step"], "teacher", SIZE)
    probe = synthetic_probe(6, 64, 0, size=SIZE)
    n = maps["norm"].shape[0]
    fig = plots.attention_maps(probe, maps, SIZE, colorbars=False)
    assert len(fig.axes) == n * (1 + 1 + 1 + 4)  # image, norm, CLS, 4 registers
    figures.close(fig)
    fig = plots.attention_maps(probe, maps, SIZE)  # by default one colour bar per map column
    assert len(fig.axes) == (n + 1) * (1 + 1 + 1 + 4)  # a row of colour bars (none under the images)
    assert not fig.axes[n * 7].axison
    bars = fig.axes[n * 7 + 1 :]
    assert [b.get_xlabel() for b in bars] == ["L2 norm"] + ["attention"] * 5
    norm_images = [ax.images[0] for ax in fig.axes[: n * 7] if ax.get_images() and ax.images[0].cmap.name == "inferno"]
    assert len(norm_images) == n and len({im.get_clim() for im in norm_images}) == 1  # the column's shared scale
    assert norm_images[0].get_clim() == (float(maps["norm"].min()), float(maps["norm"].max()))
    figures.close(fig)
    no_attention = {k: v for k, v in maps.items() if k in ("norm", "outliers")}
    fig = plots.attention_maps(probe.permute(0, 2, 3, 1).numpy(), no_attention)
    assert len(fig.axes) == (n + 1) * 2  # image and norm map, the norm column's colour bar
    figures.close(fig)


def test_emergence_heatmap_with_artifacts_and_one_step(runs, tmp_path):
    records = [with_artifacts(r, first_layer=5 - 2 * i) for i, r in enumerate(read_records(runs[0]))]
    path = figures.save(plots.emergence_heatmap(records), tmp_path / "emergence.png")
    assert min(png_size(path)) > 100
    path = figures.save(plots.emergence_heatmap(records[:1], detector="robust_z"), tmp_path / "one_step.png")
    assert min(png_size(path)) > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emergence.png", "one_step.png"]  # no temporary files
    assert_no_open_figures()


def test_emergence_heatmap_needs_matching_records(runs):
    with pytest.raises(ValueError, match="student"):
        plots.emergence_heatmap(read_records(runs[0]), model="student")


@pytest.mark.parametrize("registers", [0, 4])
def test_write_report(runs, tmp_path, registers):
    last = read_records(runs[registers])[-1]
    maps = read_maps(runs[registers], last["step"], "teacher", SIZE)
    probe = synthetic_probe(6, 64, 0, size=SIZE)
    if not registers:
        last = with_artifacts(last)  # the thresholds, emergence lines and position marks get drawn too
    out = write_report(tmp_path / "report", last, maps, probe, name=f"tiny R={registers}")
    names = {
        "norm_histograms.png",
        "norm_histograms_postnorm.png",
        "layer_quantiles.png",
        "outlier_fractions.png",
        "position_map.png",
        "attention_maps.png",
    }
    assert {p.name for p in out["plots"]} == names
    for path in out["plots"]:
        assert path.parent == tmp_path / "report"
        width, height = png_size(path)
        assert 200 <= width <= 2500 and 150 <= height <= 2000, (path.name, width, height)

    report = json.loads(Path(out["json"]).read_text())
    assert report["record"] == json.loads(json.dumps(json_ready(last)))
    summary = report["summary"]
    assert summary["name"] == f"tiny R={registers}" and summary["step"] == last["step"]
    assert summary["num_registers"] == registers
    assert summary["emergence_layer"] == last["emergence_layer"]
    assert set(summary["last_patch_outlier_fraction"]) == set(last["outliers"])
    assert summary["max_median_ratio"] == pytest.approx(last["max_median_ratio"][-1])
    if registers:
        assert set(summary["registers"]) >= {"identical", "absorbing", "cosine_max", "norm_ratio", "norm_ratio_max"}
        assert isinstance(summary["registers"]["norm_ratio_max"], float)
        assert isinstance(summary["register_flags"], list)
    else:
        assert summary["registers"] is None and summary["last_register_outlier_fraction"] is None
    assert set(summary) <= set(report["legend"]) <= set(LEGEND)
    assert all(isinstance(v, str) and v for v in report["legend"].values())
    assert_no_open_figures()


def test_report_with_artifacts_without_maps(runs, tmp_path, monkeypatch):
    def fake_save(fig, path):  # the plots render in test_write_report; here only which ones matter
        figures.close(fig)
        Path(path).write_bytes(b"")
        return Path(path)

    monkeypatch.setattr(report_module, "save", fake_save)
    last = read_records(runs[4])[-1]
    out = write_report(tmp_path, with_artifacts(last), None)
    assert len(out["plots"]) == 5 and "attention_maps.png" not in {p.name for p in out["plots"]}
    summary = json.loads(Path(out["json"]).read_text())["summary"]
    assert summary["has_artifacts"] and summary["emergence_layer"][last["detector"]] == 3
    assert summary["last_patch_outlier_fraction"][last["detector"]] == 0.02
    assert "artifacts_in_patches" in summary["register_flags"]

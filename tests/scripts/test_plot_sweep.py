"""The sweep plotting CLI, run as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.telemetry.test_plots import shared_runs

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plot_sweep.py"
OUTPUTS = [
    "outlier_fraction_vs_step.png",
    "emergence_layer_vs_step.png",
    "layer_quantiles_last_step.png",
    "register_neurons_vs_step.png",
    "locality_channels_vs_step.png",
    "attention_maps.png",
    "sweep_summary.json",
]


def load_script():
    spec = importlib.util.spec_from_file_location("plot_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, Path]:
    runs = shared_runs(tmp_path_factory)
    return {"r0": runs[0], "r4": runs[4]}


def test_sweep_writes_every_plot(sweep, tmp_path):
    out = tmp_path / "plots"
    cmd = [sys.executable, str(SCRIPT), str(sweep["r0"]), str(sweep["r4"]), "--out", str(out), "--images", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    for name in OUTPUTS[:-1]:
        with Image.open(out / name) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 300 and img.height >= 150, name
    with Image.open(out / "attention_maps.png") as img:
        assert img.height < img.width  # 2 probe rows; image + 2 CLS + 4 register columns
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["model"] == "teacher" and summary["resolution"] == 56
    runs = summary["runs"]
    assert [r["registers"] for r in runs] == [0, 4]
    assert [r["label"] for r in runs] == ["R=0", "R=4"]
    assert [r["dir"] for r in runs] == [str(sweep["r0"]), str(sweep["r4"])]
    assert [r["last_step"] for r in runs] == [10, 5] and runs[0]["steps"] == [0, 10]
    assert runs[0]["last_register_outlier_fraction"] is None
    assert isinstance(runs[1]["last_register_outlier_fraction"], float)
    for r in runs:
        assert set(r["last_outlier_fractions"]) == {"fixed", "robust_z", "valley"}
        assert set(r["emergence_layers"]) == {"fixed", "robust_z", "valley"}
        assert isinstance(r["last_patch_outlier_fraction"], float)
        assert (
            list(r["cls_patch_cosine_by_step"]) == list(r["channel_outliers_by_step"]) == [str(s) for s in r["steps"]]
        )
        assert all(-1 <= c <= 1 for c in r["cls_patch_cosine_by_step"].values())
        assert list(r["register_neurons_by_step"]) == [str(s) for s in r["steps"]]


def test_dir_without_telemetry_fails_with_its_name(sweep, tmp_path, capsys):
    plot_sweep = load_script()
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert plot_sweep.main([str(sweep["r0"]), str(empty), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(empty) in err and "no telemetry" in err
    assert not (tmp_path / "out").exists()

    assert plot_sweep.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_wrong_model_or_resolution_fails_with_a_message(sweep, tmp_path, capsys):
    plot_sweep = load_script()
    assert plot_sweep.main([str(sweep["r0"]), "--model", "student", "--out", str(tmp_path)]) == 1
    assert "no student telemetry" in capsys.readouterr().err
    assert plot_sweep.main([str(sweep["r0"]), "--resolution", "224", "--out", str(tmp_path)]) == 1
    assert "224px" in capsys.readouterr().err


def test_ambiguous_labels_name_the_dir():
    plot_sweep = load_script()
    dirs = [Path("runs/a"), Path("runs/b"), Path("runs/c")]
    assert plot_sweep.run_labels(dirs, [0, 0, 4]) == ["R=0 (a)", "R=0 (b)", "R=4"]
    same_name = [Path("x/run"), Path("y/run")]
    assert plot_sweep.run_labels(same_name, [4, 4]) == ["R=4 (x/run)", "R=4 (y/run)"]


def test_register_neuron_panel_follows_the_planted_neuron(tmp_path):
    """A run whose planted register neuron (tests/telemetry/planted.py) stays in block 5, then moves to
    block 4: the panel's series and the summary show the best neuron, its ratio and the top-k overlap."""
    from tests.telemetry.planted import IMG, planted_vit, probe_images
    from vitreg.telemetry.measure import measure
    from vitreg.telemetry.neurons import top_k_overlap
    from vitreg.telemetry.store import TelemetryWriter, read_records, telemetry_dir

    plot_sweep = load_script()
    probe = probe_images(3)
    writer = TelemetryWriter(telemetry_dir(tmp_path / "run"))
    previous = None
    for step, block in ((0, 5), (10, 5), (20, 4)):
        record, _ = measure(planted_vit(0, patches=[3, 12, 40, 51], block=block), probe, IMG)
        neurons = record["register_neurons"]
        neurons["overlap"] = top_k_overlap(neurons["neurons"], previous)  # as the training callback sets it
        previous = neurons["neurons"]
        writer.write({**record, "step": step, "model": "teacher"})
    records = read_records(tmp_path / "run")
    series = plot_sweep.neuron_series(records)
    assert series["steps"].tolist() == [0, 10, 20] and series["top_layer"].tolist() == [5, 5, 4]
    assert (series["top_ratio"] > 1000).all()
    assert math.isnan(series["overlap"][0]) and series["overlap"][1] == 1.0 and 0 <= series["overlap"][2] < 1

    out = tmp_path / "plots"
    assert plot_sweep.main([str(tmp_path / "run"), "--out", str(out)]) == 0
    with Image.open(out / "register_neurons_vs_step.png") as img:
        assert img.width >= 600 and img.height >= 200
    (run,) = json.loads((out / "sweep_summary.json").read_text())["runs"]
    by_step = run["register_neurons_by_step"]
    assert [(v["top"]["layer"], v["top"]["neuron"]) for v in by_step.values()] == [(5, 0), (5, 0), (4, 0)]
    assert [v["overlap"] for v in by_step.values()][:2] == [None, 1.0]

    # records from before the statistic existed: no panel, a warning, the other plots as before
    for record in records:
        del record["register_neurons"]
    assert plot_sweep.plot_register_neurons([{"records": records, "label": "R=0"}], "teacher", IMG) is None

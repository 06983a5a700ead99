"""task=ttr end to end: test-time registers on an official-layout file and on a vitreg checkpoint, measured
beside the plain model (and a second checkpoint) with the same metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.assets.make_checkpoint_v1 import ASSET_VITT
from tests.eval.test_tasks import PLANTED, analyze_cfg, run
from tests.telemetry.planted import planted_vit
from vitreg.config import ConfigError
from vitreg.eval.summary import ttr_lines
from vitreg.models import TestTimeRegisters, load_dinov2_backbone
from vitreg.models.checkpoint import save_dinov2_checkpoint
from vitreg.models.config import VIT_SIZES

OLD_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "checkpoint_v1" / "last.ckpt"
PLANTED_NEURON = {"layer": 5, "neuron": 0}  # planted_vit writes the high norms with this FFN neuron


@pytest.fixture(scope="module")
def planted_files(tmp_path_factory) -> tuple[Path, Path]:
    """An official-layout file with planted patch outliers, and one whose artifacts sit in a register
    (the 'trained registers' model to compare with)."""
    root = tmp_path_factory.mktemp("ttr")
    save_dinov2_checkpoint(planted_vit(num_registers=4, patches=PLANTED, block=5), root / "planted.pth")
    save_dinov2_checkpoint(planted_vit(num_registers=4, registers=[0], block=5), root / "registers.pth")
    return root / "planted.pth", root / "registers.pth"


@pytest.mark.slow
def test_ttr_removes_the_planted_outliers_of_an_official_layout_file(planted_files, tmp_path):
    planted, registers = planted_files
    cfg = analyze_cfg(
        [
            "task=ttr",
            f"checkpoint={planted}",
            f"compare={registers}",
            "num_images=8",
            "data.resolution=112",
            "register_neurons.top_k=1",
            "ttr.metrics=[telemetry,local]",
            "outliers.min_outliers=4",
            "ttr.export=true",
        ]
    )
    result = run(cfg, tmp_path)["result"]
    assert [(n["layer"], n["neuron"]) for n in result["neurons"]] == [(5, 0)]
    plain, ttr, trained = (result["metrics"][k] for k in ("plain", "ttr", "compare"))
    assert plain["patch_outlier_fraction"] == pytest.approx(len(PLANTED) / 64)
    assert plain["emergence_layer"] == 6  # after block 5
    assert ttr["patch_outlier_fraction"] == 0 and ttr["emergence_layer"] is None
    assert ttr["patch_norm_max"] < plain["patch_norm_max"] / 3
    assert trained["patch_outlier_fraction"] == 0  # its artifact lives in a register
    assert plain["position_top1_outlier"] is not None and ttr["position_top1_outlier"] is None  # no outlier left
    assert (tmp_path / "ttr.png").stat().st_size > 0
    exported = load_dinov2_backbone(result["export"])
    assert isinstance(exported, TestTimeRegisters) and exported.neurons == [(5, 0)]
    lines = ttr_lines(result)
    assert lines[0].startswith("1 register neurons (found at block 10") and "compare" in lines[1]


@pytest.mark.slow
def test_ttr_reads_the_neurons_of_a_register_neurons_run(planted_files, tmp_path):
    planted, _ = planted_files
    first = analyze_cfg(["task=register_neurons", f"checkpoint={planted}", "num_images=4", "data.resolution=112"])
    run(first, tmp_path / "neurons")
    cfg = analyze_cfg(
        [
            "task=ttr",
            f"checkpoint={planted}",
            f"ttr.neurons={tmp_path / 'neurons' / 'register_neurons.json'}",
            "num_images=4",
            "data.resolution=112",
            "ttr.metrics=[telemetry]",
        ]
    )
    result = run(cfg, tmp_path / "ttr")["result"]
    assert len(result["neurons"]) == 50 and result["neurons"][0] == PLANTED_NEURON  # the paper's top-k
    assert result["detection"] == {"from": str(tmp_path / "neurons" / "register_neurons.json")}
    assert result["metrics"]["ttr"]["patch_outlier_fraction"] == 0


def test_ttr_on_a_vitreg_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setitem(VIT_SIZES, "vitt", ASSET_VITT)  # the asset's shrunk architecture
    neurons = tmp_path / "neurons.json"
    neurons.write_text(json.dumps({"result": {"neurons": [{"layer": 1, "neuron": 3}, {"layer": 0, "neuron": 7}]}}))
    cfg = analyze_cfg(
        [
            "task=ttr",
            f"checkpoint={OLD_CHECKPOINT}",
            f"ttr.neurons={neurons}",
            "ttr.num_tokens=2",
            "num_images=4",
            "ttr.metrics=[telemetry]",
        ]
    )
    payload = run(cfg, tmp_path)
    assert payload["source"] == "vitreg" and payload["result"]["num_test_time_registers"] == 2
    plain, ttr = payload["result"]["metrics"]["plain"], payload["result"]["metrics"]["ttr"]
    assert plain.keys() == ttr.keys() and plain != ttr  # two neurons moved: the numbers change


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ttr.patch_values=median", "ttr.patch_values"),
        ("ttr.metrics=[knn,bogus]", "ttr.metrics"),
        ("ttr.num_tokens=0", "ttr.num_tokens"),
        ("ttr.neurons=/nonexistent/register_neurons.json", "ttr.neurons"),
        ("compare=/nonexistent/reg4.pth", "compare"),
    ],
)
def test_bad_ttr_settings_fail_at_start_naming_the_key(planted_files, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        analyze_cfg(["task=ttr", f"checkpoint={planted_files[0]}", override])


def test_a_file_that_is_not_a_neuron_list_is_refused(planted_files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"result": {"threshold": 3}}))
    cfg = analyze_cfg(["task=ttr", f"checkpoint={planted_files[0]}", f"ttr.neurons={bad}", "ttr.metrics=[telemetry]"])
    with pytest.raises(ValueError, match="is not the JSON of task=register_neurons"):
        run(cfg, tmp_path)

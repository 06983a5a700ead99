import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.telemetry.planted import IMG, planted_vit
from vitreg.models.checkpoint import export_dinov2_state_dict, save_dinov2_checkpoint
from vitreg.models.load import load_backbone
from vitreg.telemetry.analyze import analyze_checkpoint

REPO = Path(__file__).resolve().parents[2]
PLANTED = [0, 9, 27, 63]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "planted_hub.pth"
    save_dinov2_checkpoint(planted_vit(4, patches=PLANTED, block=5), path, layout="hub")
    return path


def test_official_layout_checkpoint_report_finds_the_planted_artifacts(official_checkpoint, photo_folder, tmp_path):
    summary = analyze_checkpoint(official_checkpoint, tmp_path / "report", images=photo_folder, resolutions=[IMG])
    assert summary["source"] == "dinov2"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["summary"]["emergence_layer"]["valley"] == 6
    assert report["record"]["num_images"] == 6  # every decodable image, the text file ignored
    np.testing.assert_array_equal(np.array(report["record"]["position_frequency"]).ravel()[PLANTED], 1.0)
    for png in ("norm_histograms.png", "layer_quantiles.png", "outlier_fractions.png", "position_map.png"):
        assert Image.open(tmp_path / "report" / png).size[0] > 100


def test_several_resolutions_write_one_report_each(official_checkpoint, tmp_path):
    summary = analyze_checkpoint(official_checkpoint, tmp_path, num_images=3, resolutions=[56, IMG])
    assert set(summary["reports"]) == {56, IMG}
    for res in (56, IMG):
        record = json.loads((tmp_path / f"r{res}" / "report.json").read_text())["record"]
        assert record["resolution"] == res and record["grid"] == [res // 14, res // 14]


def test_vitreg_training_checkpoint_rebuilds_the_model_from_its_config(tmp_path):
    model = planted_vit(2)
    model.pos_embed.data.normal_()
    state = {f"objective.teacher.backbone.{k}": v for k, v in export_dinov2_state_dict(model).items()}
    state.update(
        {f"objective.student.backbone.{k}": torch.zeros_like(v) for k, v in export_dinov2_state_dict(model).items()}
    )
    cfg = {
        "model": {"arch": "vitt", "patch_size": 14, "num_register_tokens": 2, "layerscale_init": None,
                  "interpolate_antialias": False, "interpolate_offset": 0.1, "ffn_layer": None},
        "augment": {"global_crops_size": IMG},
    }  # fmt: skip
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}, "global_step": 7}, path)
    loaded = load_backbone(path)
    assert (loaded.source, loaded.step, loaded.train_resolution) == ("vitreg", 7, IMG)
    assert loaded.model.cfg.interpolate_antialias is False and loaded.model.cfg.interpolate_offset == 0.1
    torch.testing.assert_close(loaded.model.pos_embed, model.pos_embed, rtol=0, atol=0)
    student = load_backbone(path, which="student")
    assert float(student.model.pos_embed.detach().abs().sum()) == 0.0


def run_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train" / "analyze.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_entry_point_writes_the_report_and_prints_the_summary(official_checkpoint, photo_folder, tmp_path):
    # sweep run directories contain "=", which Hydra's override grammar would misread unquoted
    sweep_dir = tmp_path / "demo" / "registers=4"
    sweep_dir.mkdir(parents=True)
    checkpoint = sweep_dir / "planted.pth"
    checkpoint.write_bytes(official_checkpoint.read_bytes())
    out = sweep_dir / "out"
    result = run_analyze(f"checkpoint={checkpoint}", f"images={photo_folder}", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "emergence_layer" in result.stdout and (out / "report.json").exists()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()  # nothing else written


def test_entry_point_rejects_a_missing_checkpoint_naming_the_key(tmp_path):
    result = run_analyze(f"checkpoint={tmp_path / 'nope.pth'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "checkpoint: no file at" in result.stderr

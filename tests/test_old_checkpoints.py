"""A checkpoint written by older code (``tests/assets/checkpoint_v1``, see its ``make_checkpoint_v1.py``)
still loads: its backbones compute what they computed then, it exports, and a run resumes from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from tests.assets.make_checkpoint_v1 import ASSET_VITT
from tests.conftest import TINY, compose_config

ASSET = Path(__file__).resolve().parent / "assets" / "checkpoint_v1"


@pytest.fixture
def shrunk_vitt(monkeypatch):
    """The asset was written with the size ``vitt`` shrunk (to keep it small); read it the same way."""
    from vitreg.models.config import VIT_SIZES

    monkeypatch.setitem(VIT_SIZES, "vitt", ASSET_VITT)


def same_as_recorded(actual: torch.Tensor, recorded: torch.Tensor) -> None:
    """Bitwise on the machine that wrote the asset. Another CPU's kernels may round the last bit differently
    (1.2e-7 on the student CLS on a 2-core AMD EPYC), so a few ulps are allowed: far below any change of
    computation, which moves these O(1) values by 1e-3 or more."""
    torch.testing.assert_close(actual, recorded, rtol=0, atol=1e-6)


def load_old_backbone(which: str):
    from vitreg.models.load import load_backbone

    return load_backbone(ASSET / "last.ckpt", which)


def test_the_old_backbones_compute_what_they_computed(shrunk_vitt):
    expected = load_file(ASSET / "expected.safetensors")
    teacher, student = load_old_backbone("teacher"), load_old_backbone("student")
    assert (teacher.source, teacher.step, teacher.train_resolution) == ("vitreg", 2, 28)
    assert teacher.model.num_register_tokens == 2
    with torch.no_grad():
        out = teacher.model.forward_features(expected["images"])
        same_as_recorded(out["x_norm_clstoken"], expected["teacher_cls"])
        same_as_recorded(out["x_norm_patchtokens"], expected["teacher_patches"])
        same_as_recorded(out["x_norm_regtokens"], expected["teacher_registers"])
        same_as_recorded(student.model(expected["images"]), expected["student_cls"])


def test_the_old_checkpoint_exports_to_timm(shrunk_vitt, tmp_path):
    from scripts.export_backbone import main as export_main

    out = export_main([str(ASSET / "last.ckpt"), str(tmp_path / "backbone.safetensors"), "--format", "timm"])
    exported = load_file(out)
    assert exported["cls_token"].shape == (1, 1, ASSET_VITT["embed_dim"])
    assert exported["reg_token"].shape == (1, 2, ASSET_VITT["embed_dim"])


def test_a_run_resumes_from_the_old_checkpoint(shrunk_vitt, tmp_path):
    from vitreg.lit.pretrain import pretrain

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copyfile(ASSET / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    cfg = compose_config([*TINY, "registers=2", "callbacks.telemetry.enabled=false"], run_dir=run_dir)
    with open_dict(cfg):
        cfg.trainer.max_steps = 3
    pretrain(cfg)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    # the old file kept its stream position in ExactResume's entry; the data module saves it now
    positions = ckpt["SyntheticDataModule"]["ranks"][0]["positions"]
    assert positions == {0: 12}  # the old file's stream position (8 images) continued by one batch of 4
    # the step taken from the old file is the step the old code took from it
    from vitreg.models.load import load_backbone

    expected = load_file(ASSET / "expected.safetensors")
    teacher = load_backbone(run_dir / "checkpoints" / "last.ckpt", "teacher").model
    with torch.no_grad():
        same_as_recorded(teacher(expected["images"]), expected["resumed_teacher_cls"])

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, compose_config
from vitreg.lit.pretrain import pretrain
from vitreg.models import load_dinov2_backbone

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_export_writes_the_teacher_in_the_official_layout(tmp_path):
    run = tmp_path / "run"
    pretrain(compose_config([*TINY, "trainer.max_steps=2", "callbacks.checkpoint_every_n_steps=2"], run_dir=run))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_backbone.py"), str(run)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    exported = run / "export" / "last_teacher_hub.pth"
    state = torch.load(exported, weights_only=True)
    assert "register_tokens" in state and not any(k.startswith(("dino_head", "student", "objective")) for k in state)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    teacher = {k.removeprefix("objective.teacher.backbone."): v for k, v in ckpt["state_dict"].items()
               if k.startswith("objective.teacher.backbone.")}  # fmt: skip
    assert set(state) == set(teacher)
    for key, value in teacher.items():
        assert torch.equal(state[key], value), key
    model = load_dinov2_backbone(exported)
    assert model.num_register_tokens == 4
    assert "interpolate_antialias=True" in result.stdout


def test_export_of_a_missing_run_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_backbone.py"), str(tmp_path / "nope.ckpt")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "no checkpoint at" in result.stderr

"""The conversion CLI, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.models.reference import official_state_dict

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_dinov2_checkpoint.py"


def test_teacher_dump_to_hub_file(tmp_path):
    sd = official_state_dict(dim=64, depth=2, grid=4, registers=4)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, tmp_path / "teacher.pth")
    out = tmp_path / "hub.pth"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "teacher.pth"), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "with 4 registers" in result.stdout and "hub layout" in result.stdout
    converted = torch.load(out, weights_only=True)
    assert list(converted) == list(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)


def test_bad_file_fails_with_a_message(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "junk.pth"), str(tmp_path / "out.pth")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "as a weights-only checkpoint" in result.stderr
    assert not (tmp_path / "out.pth").exists()

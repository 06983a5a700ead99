"""Writes ``checkpoint_v1/``: a tiny training checkpoint made by the code of 2026-12-06 (before the
consolidation of issue 15), kept so that later layouts of the code are tested against a real old file.

Run once from the repository root: ``python tests/assets/make_checkpoint_v1.py``. Never regenerate it
with newer code — its whole point is that it was written by the old one. It holds:

- ``last.ckpt``: the Lightning checkpoint after 2 steps of the tests' tiny recipe with 2 registers. To
  keep the file small, the size named ``vitt`` is shrunk to ``ASSET_VITT`` while it is written (the
  tests that read it shrink it the same way: ``shrunk_vitt``);
- ``expected.safetensors``: the teacher's normalised CLS and patch tokens for fixed images, and the
  student's CLS, as that code computed them; and the teacher's CLS after that code resumed the run
  from ``last.ckpt`` for one more step (``resumed_teacher_cls``);
- ``config.yaml``: the run's config, as the run wrote it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import open_dict
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY, compose_config  # noqa: E402
from vitreg.lit.pretrain import pretrain  # noqa: E402
from vitreg.models.config import VIT_SIZES  # noqa: E402
from vitreg.models.load import load_backbone  # noqa: E402

OUT = Path(__file__).resolve().parent / "checkpoint_v1"
ASSET_VITT = {"embed_dim": 24, "depth": 2, "num_heads": 2}


def expected_outputs(ckpt: Path) -> dict[str, torch.Tensor]:
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    teacher = load_backbone(ckpt, "teacher").model
    student = load_backbone(ckpt, "student").model
    with torch.no_grad():
        out = teacher.forward_features(images)
        return {
            "images": images,
            "teacher_cls": out["x_norm_clstoken"].contiguous(),
            "teacher_patches": out["x_norm_patchtokens"].contiguous(),
            "teacher_registers": out["x_norm_regtokens"].contiguous(),
            "student_cls": student(images).contiguous(),
        }


def train(run_dir: Path, steps: int) -> Path:
    cfg = compose_config([*TINY, "registers=2", "callbacks.telemetry.enabled=false"], run_dir=run_dir)
    with open_dict(cfg):
        cfg.trainer.max_steps = steps
    pretrain(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


def main() -> None:
    VIT_SIZES["vitt"] = ASSET_VITT
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train(Path(tmp) / "run", 2)
        OUT.mkdir(exist_ok=True)
        shutil.copyfile(ckpt, OUT / "last.ckpt")
        shutil.copyfile(Path(tmp) / "run" / "config.yaml", OUT / "config.yaml")
        resumed = Path(tmp) / "resumed"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copyfile(ckpt, resumed / "checkpoints" / "last.ckpt")
        expected = expected_outputs(OUT / "last.ckpt")
        expected["resumed_teacher_cls"] = expected_outputs(train(resumed, 3))["teacher_cls"]
        save_file(expected, OUT / "expected.safetensors")


if __name__ == "__main__":
    main()

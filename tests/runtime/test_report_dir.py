"""Report folders of train/analyze.py: named by the checkpoint's step, ``last`` a link to the newest, old
folders still found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitreg.runtime.report_dir import default_report_dir, latest_report, link_last, report_folders

REPO = Path(__file__).resolve().parents[2]


def fake_checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": step}, path)
    return path


def write_report(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "knn.json").write_text(json.dumps({"task": "knn", "step": step}))
    return folder


def test_last_checkpoint_reports_are_named_by_step_and_never_overwritten(tmp_path):
    run = tmp_path / "run"
    last = fake_checkpoint(run / "checkpoints" / "last.ckpt", 1250)
    first = default_report_dir(last)
    assert first == run / "analysis" / "step0001250"
    write_report(first, 1250)
    assert link_last(first) == run / "analysis" / "last"
    fake_checkpoint(last, 2500)  # the run went on: same file name, another state
    second = default_report_dir(last)
    assert second == run / "analysis" / "step0002500"
    write_report(second, 2500)
    link_last(second)
    assert json.loads((first / "knn.json").read_text())["step"] == 1250  # the first report is intact
    assert os.readlink(run / "analysis" / "last") == "step0002500"  # relative: the run dir can move
    # an older checkpoint analysed later does not move the link off the newest step
    step_ckpt = fake_checkpoint(run / "checkpoints" / "step0001250.ckpt", 1250)
    assert default_report_dir(step_ckpt) == first
    link_last(first)
    assert latest_report(run) == second.resolve()
    assert not list((run / "analysis").glob(".*.tmp"))  # the link was replaced through a renamed temporary


def test_other_files_keep_their_stem(tmp_path):
    assert default_report_dir(tmp_path / "dinov2_vitl14_reg4_pretrain.pth") == Path(
        "outputs/analysis/dinov2_vitl14_reg4_pretrain"
    )
    assert link_last(tmp_path / "elsewhere" / "report") is None  # out=...: no link outside a run's analysis/


@pytest.mark.parametrize(("recorded_step", "moved_to"), [(300, "step0000300"), (None, "last-legacy")])
def test_an_old_last_folder_is_kept_and_found(tmp_path, recorded_step, moved_to):
    """Before step names, every report of last.ckpt went to analysis/last/ (a real folder)."""
    analysis = tmp_path / "run" / "analysis"
    old = analysis / "last"
    old.mkdir(parents=True)
    (old / "knn.json").write_text(json.dumps({"task": "knn", "step": recorded_step}))
    write_report(analysis / "step0000100", 100)  # an old step checkpoint's report (its stem was already a step)
    assert latest_report(tmp_path / "run") == analysis / "step0000100"  # the highest step, before any link
    assert set(report_folders(tmp_path / "run")) == {"last", "step0000100"}
    new = write_report(analysis / "step0000600", 600)
    link_last(new)
    assert json.loads((analysis / moved_to / "knn.json").read_text())["step"] == recorded_step
    assert (analysis / "last").is_symlink() and os.readlink(analysis / "last") == "step0000600"
    assert set(report_folders(tmp_path / "run")) == {moved_to, "step0000100", "step0000600"}


@pytest.mark.slow
def test_analyze_on_last_ckpt_writes_a_step_folder_beside_an_old_last(tmp_path):
    """train/analyze.py on a run's last.ckpt (step 9) whose analysis/last/ holds an old report (step 5, written
    before step names): both reports kept, ``last`` -> step 9."""
    from tests.telemetry.planted import IMG, planted_vit
    from vitreg.models.checkpoint import export_dinov2_state_dict

    state = {f"objective.teacher.backbone.{k}": v for k, v in export_dinov2_state_dict(planted_vit(2)).items()}
    cfg = {
        "model": {"arch": "vitt", "patch_size": 14, "num_register_tokens": 2, "layerscale_init": None,
                  "interpolate_antialias": False, "interpolate_offset": 0.1, "ffn_layer": None},
        "augment": {"global_crops_size": IMG},
    }  # fmt: skip
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}, "global_step": 9}, last)
    analysis = tmp_path / "run" / "analysis"
    (analysis / "last").mkdir(parents=True)
    (analysis / "last" / "report.json").write_text(json.dumps({"summary": {}, "record": {"step": 5}}))
    done = subprocess.run(
        [sys.executable, str(REPO / "train" / "analyze.py"), f"checkpoint={last}", "num_images=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads((analysis / f"step000000{s}" / "report.json").read_text())["record"]["step"] for s in (5, 9)]
    assert steps == [5, 9]
    assert os.readlink(analysis / "last") == "step0000009"
    assert str(analysis / "step0000009") in done.stdout  # the console names the folder written

"""Progress of train/analyze.py's long loops: a bar on a terminal, newline-terminated lines otherwise, rank 0
only, silent unless turned on."""

from __future__ import annotations

import io

import pytest
import torch

import vitreg.eval.progress as progress_mod
from tests.eval.test_features import tiny_vit
from tests.eval.test_lost import CASES, keyed_vit, write_dataset
from vitreg.eval.features import extract_features
from vitreg.eval.linear import LinearClassifierGrid, train_grid
from vitreg.eval.lost import evaluate_lost
from vitreg.eval.progress import TaskProgress, set_progress, track


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines():
    """Progress on, as lines (what a SLURM log gets); restored afterwards."""
    before = progress_mod.get_progress()
    set_progress("lines")
    yield
    set_progress(before)


def test_lines_every_tenth_and_a_final_line():
    stream, clock = io.StringIO(), Clock()
    with TaskProgress("kNN bank features", 40, stream=stream, mode="lines", clock=clock) as p:
        for _ in range(40):
            clock.now += 0.5
            p.update()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    out = text.splitlines()
    assert len(out) == 10  # 10 %, 20 %, ..., 90 %, then the final line
    assert out[0] == "kNN bank features: 4/40 batches  10%  2.0 batches/s  eta 0:00:18"
    assert out[-1] == "kNN bank features: 40/40 batches  100%  2.0 batches/s  done in 0:00:20"


def test_unknown_length_reports_by_time():
    stream, clock = io.StringIO(), Clock()
    with TaskProgress("features", None, stream=stream, mode="lines", min_interval_s=60, clock=clock) as p:
        for _ in range(300):  # one batch a second: a line a minute
            clock.now += 1.0
            p.update()
    out = stream.getvalue().splitlines()
    assert len(out) == 6 and out[0] == "features: 60 batches  1.0 batches/s  elapsed 0:01:00"
    assert out[-1].endswith("done in 0:05:00")


def test_a_terminal_gets_a_bar_and_other_ranks_nothing(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    list(track(range(5), "linear grid training", stream=tty, mode="auto"))
    assert "\r" in tty.getvalue() and "5/5" in tty.getvalue()  # tqdm's bar
    monkeypatch.setattr(progress_mod, "rank_and_world", lambda: (1, 2))
    other = io.StringIO()
    list(track(range(5), "linear grid training", stream=other, mode="lines"))
    assert other.getvalue() == ""


def test_library_calls_are_silent_by_default(capsys):
    assert progress_mod.get_progress() == "off"
    extract_features(tiny_vit(), [(torch.randn(2, 3, 28, 28), torch.tensor([0, 1]))])
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="progress must be one of"):
        set_progress("verbose")


def test_features_linear_grid_and_lost_report_progress(lines, capsys, tmp_path):
    images, labels = torch.randn(6, 3, 28, 28), torch.tensor([0, 1, 0, 1, 0, 1])
    features = extract_features(tiny_vit(), [(images[i : i + 2], labels[i : i + 2]) for i in range(0, 6, 2)])
    grid = LinearClassifierGrid(features.cls.shape[-1], 2, n_last_blocks=(1,), learning_rates=(0.1,), batch_size=6)
    batch = (features.cls, features.patch_mean, features.labels)
    train_grid(grid, iter([batch] * 10), 10)
    evaluate_lost(keyed_vit(4, depth=1), write_dataset(tmp_path, CASES[:2]), progress=True)
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in out if line.startswith("features")][-1] == "features: 3/3 batches"
    grid_lines = [line for line in out if line.startswith("linear grid training")]
    assert len(grid_lines) == 10 and grid_lines[-1].startswith("linear grid training: 10/10 iterations  100%")
    assert [line for line in out if line.startswith("LOST")][-1].startswith("LOST: 2/2 images")


def test_occlusion_reports_its_batches(lines, capsys):
    from vitreg.eval.occlusion import feature_correlation

    feature_correlation(tiny_vit(), torch.randn(4, 3, 28, 28), [0.5], batch_size=2)
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("occlusion: PatchDrop: 2/2 batches  100%")

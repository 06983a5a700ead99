"""The sweep-level summary printed after a Hydra ``-m`` sweep (conf/hydra/default.yaml's SweepSummary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY
from vitreg.runtime.sweep_summary import SweepSummary, runs_written_since, sweep_lines, write_run_summary

REPO = Path(__file__).resolve().parents[2]


def fake_run(root: Path, registers: int, *, layers=(None, None), knn=None, loss=None, csv_loss=None) -> Path:
    """A run directory as pretrain leaves it: config.yaml, .hydra/, summary.json, telemetry records."""
    run = root / f"registers={registers}"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({"registers": registers, "callbacks": {"telemetry": {"detector": "valley"}}}, run / "config.yaml")
    if loss is not None:
        summary = {"steps": 300, "finished": True, "final_loss": loss}
        if knn is not None:
            summary["knn"] = {
                "before": {"top1_k10": 10.0, "top1_k20": 10.0},
                "after": {"top1_k10": knn, "top1_k20": knn},
            }
        write_run_summary(run, summary)
    if csv_loss is not None:
        (run / "logs").mkdir()
        (run / "logs" / "metrics.csv").write_text(
            f"step,train/loss,lr\n9,{csv_loss + 1},0.1\n10,,0.1\n19,{csv_loss},0.1\n"
        )
    (run / "telemetry").mkdir()
    records = [
        {"step": step, "model": "teacher", "resolution": 28, "emergence_layer": {"valley": layer, "fixed": None}}
        for step, layer in zip((100, 300), layers, strict=True)
    ]
    (run / "telemetry" / "telemetry.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_lines_name_each_run_its_loss_knn_emergence_and_the_plot_command(tmp_path):
    r0 = fake_run(tmp_path, 0, layers=(2, 2), knn=56.4, loss=9.1234)
    r4 = fake_run(tmp_path, 4, loss=9.5, knn=51.0)
    old = fake_run(tmp_path, 8, csv_loss=8.75)  # an earlier version's run: no summary.json, loss from metrics.csv
    lines = sweep_lines([r0, r4, old], tmp_path)
    assert lines[0] == f"sweep of 3 runs in {tmp_path}:"
    assert " ".join(lines[1].split()) == "run directory R steps final loss kNN top-1 emergence (valley)"
    assert lines[2].split()[1:] == ["0", "300", "9.1234", "56.4%", "(k=20)", "layer", "2", "(from", "step", "100)"]
    assert lines[3].split()[1:] == ["4", "300", "9.5000", "51.0%", "(k=20)", "none", "at", "step", "300"]
    assert lines[4].split()[1:] == ["8", "-", "8.7500", "-", "none", "at", "step", "300"]
    assert lines[-1] == f"compare them: python scripts/plot_sweep.py {r0} {r4} {old} --out {tmp_path / 'sweep_plots'}"


def test_runs_of_a_remote_launcher_are_found_by_time(tmp_path):
    before = fake_run(tmp_path, 0, loss=1.0)
    past = time.time() - 3600
    os.utime(before / "config.yaml", (past, past))  # a run of an earlier sweep in the same directory
    since = time.time() - 1
    now = fake_run(tmp_path, 4, loss=1.0)
    (tmp_path / "sweep_plots").mkdir()  # not a run
    assert runs_written_since(tmp_path, since) == [now]


def test_callback_prints_the_jobs_it_ran(tmp_path, capsys):
    runs = [fake_run(tmp_path, r, loss=1.0) for r in (0, 1)]
    callback = SweepSummary()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback.on_multirun_start(config)
    for run in runs:
        callback.on_job_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run)}}}), job_return=None)
    callback.on_multirun_end(config)
    out = capsys.readouterr().out
    assert f"sweep of 2 runs in {tmp_path}:" in out and "compare them: python scripts/plot_sweep.py" in out


@pytest.mark.slow
def test_a_real_sweep_ends_with_one_summary(tmp_path):
    """``train/pretrain.py -m registers=0,1``: after both jobs, one table with both runs and the plot command."""
    cmd = [
        *(sys.executable, "train/pretrain.py", "-m", *TINY, "registers=0,1", "trainer.max_steps=1"),
        *("trainer.log_every_n_steps=1", "callbacks.telemetry.every_n_steps=1", "callbacks.telemetry.attention=false"),
        *(f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    start = [i for i, line in enumerate(out) if line.startswith("sweep of 2 runs in ")]
    assert len(start) == 1, done.stdout
    rows = out[start[0] + 2 : start[0] + 4]
    assert [row.split()[1:3] for row in rows] == [["0", "1"], ["1", "1"]]  # registers, steps
    assert all(float(row.split()[3]) > 0 for row in rows)  # the final loss
    command = out[start[0] + 4]
    assert command.startswith("compare them: python scripts/plot_sweep.py ") and "--out" in command

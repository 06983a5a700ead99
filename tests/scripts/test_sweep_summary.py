"""scripts/sweep_summary.py: the end-of-sweep table for a sweep directory, at any later time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.runtime.test_sweep_summary import fake_run

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep_summary.py"


def load_script():
    spec = importlib.util.spec_from_file_location("sweep_summary_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prints_every_run_of_the_directory(tmp_path, capsys):
    runs = [fake_run(tmp_path, r, loss=2.0 + r) for r in (0, 4)]
    assert load_script().main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep of 2 runs in {tmp_path}:"
    assert [line.split()[0] for line in out[2:4]] == [str(r) for r in runs]
    assert out[-1].startswith("compare them: python scripts/plot_sweep.py ")


def test_an_empty_directory_says_so(tmp_path, capsys):
    assert load_script().main([str(tmp_path)]) == 1
    assert "no run directory" in capsys.readouterr().err

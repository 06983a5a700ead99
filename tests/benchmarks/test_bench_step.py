"""benchmarks/bench_step.py runs its tiny CPU configuration and ends with the documented line. Speed itself
is measured by the script, never asserted here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_step.py"
OFFICIAL_REPO_ENV = "VITREG_DINOV2_REPO"  # a facebookresearch/dinov2 checkout (never part of vitreg)
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def run_bench(*extra: str) -> list[str]:
    # two timed steps keep the smoke test short; one thread stays steady on cores shared with other jobs
    command = [
        sys.executable,
        str(SCRIPT),
        "--tiny",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--steps",
        "2",
        "--warmup",
        "1",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def variant_lines(lines: list[str]) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in lines if (m := re.match(r"variant (\S+): (.*)", line))}


def assert_every_variant_measured(variants: dict[str, str]) -> None:
    """Each variant printed img/s, step time and peak memory, or why it is unavailable here (never a failure)."""
    for name, text in variants.items():
        if text.startswith("unavailable ("):
            continue
        assert re.match(
            rf"{NUMBER} img/s \| step {NUMBER} ms median \({NUMBER}-{NUMBER}\) \| peak mem {NUMBER} GiB", text
        ), (
            name,
            text,
        )


@pytest.mark.slow
def test_tiny_cpu_run_prints_every_variant_and_the_vitreg_line():
    lines = run_bench()
    variants = variant_lines(lines)
    assert {"loop-eager-fp32-foreach", "lightning-eager-fp32-foreach"} <= set(variants), lines
    assert any(name.startswith("loop-compiled") for name in variants), "compiled variant missing"
    assert_every_variant_measured(variants)
    assert not variants["loop-eager-fp32-foreach"].startswith("unavailable")
    assert any(line.startswith("FLOPs per image") and "actual" in line and "nominal" in line for line in lines)
    assert re.fullmatch(rf"vitreg img/s {NUMBER}", lines[-1]), lines[-1]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(OFFICIAL_REPO_ENV), reason=f"set {OFFICIAL_REPO_ENV} to a dinov2 checkout")
def test_tiny_cpu_run_against_the_official_step():
    lines = run_bench(
        "--dinov2-repo", os.environ[OFFICIAL_REPO_ENV], "--variants", "loop-eager-fp32-foreach", "official"
    )
    variants = variant_lines(lines)
    assert set(variants) == {"loop-eager-fp32-foreach", "official"}
    assert_every_variant_measured(variants)
    assert any(line.startswith("official patches applied: ") and "#310/#391" in line for line in lines), lines
    assert re.fullmatch(rf"vitreg/official img/s ratio {NUMBER}", lines[-1]), lines[-1]

"""The register sweep on a real SLURM cluster (localhost): slurm/sweep_registers.sbatch as a job
array of three tiny CPU runs, two at a time; one task gets SIGUSR1 mid-run, checkpoints, requeues
itself, and its restart resumes from the checkpoint in the same run directory.

Slow (about a minute or two): it installs slurm-wlm and munge with apt-get when missing (skips
when that is impossible) and starts slurmctld/slurmd/munged for the test only (tests/slurm/cluster.py).
"""

from __future__ import annotations

import csv
import re
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY
from tests.slurm.cluster import TERMINAL_STATES, SlurmCluster, wait_until

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "sweep_registers.sbatch"
REGISTERS = [0, 2, 4]
SIGNALLED_TASK = 0
MAX_STEPS = 40
CHECKPOINT_EVERY = 5
TIMEOUT_S = 240


def sweep_overrides(output_root: Path, cache_dir: Path) -> list[str]:
    return [
        *TINY,
        f"trainer.max_steps={MAX_STEPS}",
        f"callbacks.checkpoint_every_n_steps={CHECKPOINT_EVERY}",
        "callbacks.telemetry.enabled=false",
        "trainer.log_every_n_steps=5",
        "logger=csv",
        f"paths.output_root={output_root}",
        f"paths.cache_dir={cache_dir}",
    ]


def submit_sweep(cluster: SlurmCluster, tmp_path: Path, overrides: list[str]) -> str:
    """Run the script directly: it submits itself, sized to REGISTERS, without GPUs."""
    env = {
        "REGISTERS": " ".join(map(str, REGISTERS)),
        "THROTTLE": "2",
        "GPUS_PER_NODE": "0",
        "CPUS_PER_TASK": "1",
        "TRAINER": "cpu",
        "PYTHON": sys.executable,
        "VITREG_ROOT": str(REPO),
        "SBATCH_OUTPUT": str(tmp_path / "slurm-%A_%a.out"),
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }
    result = cluster.run(
        ["bash", str(SCRIPT), *overrides], env={**cluster.env, **env}, cwd=tmp_path, check=True, timeout=60
    )
    job = result.stdout.strip().splitlines()[-1].split(";")[0]
    assert job.isdigit(), result.stdout + result.stderr
    return job


def task_records(cluster: SlurmCluster, job: str) -> dict[int, dict[str, str]]:
    """Array task id -> its ``scontrol show job`` record (pending tasks not yet split are skipped)."""
    out = {}
    for record in cluster.jobs(job):
        task = record.get("ArrayTaskId", "")
        if task.isdigit():
            out[int(task)] = record
    return out


def run_dir_of(output_root: Path, job: str, task: int) -> Path | None:
    found = sorted((output_root / "demo").glob(f"array{job}_{task}-*"))
    assert len(found) <= 1, f"array task {task} has several run directories: {found}"
    return found[0] if found else None


def metric_steps(metrics_csv: Path) -> list[int]:
    with open(metrics_csv) as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_register_sweep_array_with_preemption_and_requeue(slurm_cluster: SlurmCluster, tmp_path):
    started = time.monotonic()
    cluster = slurm_cluster
    output_root = tmp_path / "out"
    job = submit_sweep(cluster, tmp_path, sweep_overrides(output_root, tmp_path / "cache"))

    def tasks() -> str:  # what a timeout reports besides the cluster's logs
        return f"tasks: {task_records(cluster, job)}"

    signalled = f"{job}_{SIGNALLED_TASK}"

    # 1. Signal one task once its first checkpoint exists (it is mid-run then).
    def first_checkpoint():
        run_dir = run_dir_of(output_root, job, SIGNALLED_TASK)
        return run_dir if run_dir and (run_dir / "checkpoints" / "last.ckpt").exists() else None

    run_dir = wait_until(first_checkpoint, TIMEOUT_S, "the first checkpoint of the signalled task", cluster, tasks)
    assert task_records(cluster, job)[SIGNALLED_TASK]["JobState"] == "RUNNING"
    cluster.run(["scancel", "--signal=USR1", signalled])

    # 2. It checkpoints and requeues itself; a requeued job may only start after 121 s: start it now.
    def requeued():
        record = task_records(cluster, job).get(SIGNALLED_TASK, {})
        return record.get("Restarts") == "1" and record.get("JobState") in ("PENDING", "REQUEUED")

    wait_until(requeued, 60, "the signalled task to be requeued", cluster, tasks)
    cluster.run(["scontrol", "update", f"JobId={signalled}", "StartTime=now"])

    # 3. Every task finishes.
    def all_done():
        records = task_records(cluster, job)
        done = len(records) == len(REGISTERS) and all(r["JobState"] in TERMINAL_STATES for r in records.values())
        return records if done else None

    records = wait_until(all_done, TIMEOUT_S - (time.monotonic() - started), "all array tasks to end", cluster, tasks)
    elapsed = time.monotonic() - started

    logs = {task: (tmp_path / f"slurm-{job}_{task}.out").read_text() for task in range(len(REGISTERS))}
    for task, registers in enumerate(REGISTERS):
        record = records[task]
        assert record["JobState"] == "COMPLETED", f"task {task}: {record}\n{logs[task][-3000:]}"
        task_dir = run_dir_of(output_root, job, task)
        assert task_dir is not None and task_dir.name.startswith(f"array{job}_{task}-registers={registers},")
        config = yaml.safe_load((task_dir / "config.yaml").read_text())
        assert config["registers"] == registers and config["model"]["num_register_tokens"] == registers
        assert global_step(task_dir / "checkpoints" / "last.ckpt") == MAX_STEPS, logs[task][-3000:]
        assert f"run directory: {task_dir}" in logs[task]
        expected_restarts = 1 if task == SIGNALLED_TASK else 0
        assert record["Restarts"] == str(expected_restarts), record
        assert logs[task].count("restart 1:") == expected_restarts

    # 4. The signalled task: checkpoint + requeue once, then a restart that resumed in the same directory.
    log = logs[SIGNALLED_TASK]
    first, _, second = log.partition("restart 1:")
    saved = re.findall(r"preemption: saved checkpoint at global step (\d+)", first)
    assert len(saved) == 1, first[-3000:]
    stop_step = int(saved[0])
    assert CHECKPOINT_EVERY <= stop_step < MAX_STEPS
    assert first.count(f"requeue: SLURM job {signalled} requeued") == 1, first[-3000:]
    assert "SIGUSR1; saving" in first
    assert "`Trainer.fit` stopped: `max_steps" not in first  # it stopped early, not at the end
    assert f"resuming from {run_dir}/checkpoints/last.ckpt" in second, second[-3000:]
    # the restart's training loop began at the saved step, not at 0
    resumed_at = re.findall(r"preemption: SIGUSR1, SIGTERM, SIGINT handled at global step (\d+)", second)
    assert resumed_at == [str(stop_step)], second[-3000:]
    assert run_dir_of(output_root, job, SIGNALLED_TASK) == run_dir
    assert "preemption: requeueing" not in second and "preemption: saved" not in second
    # No step was trained twice: the CSV history (kept across the restart) strictly increases, holds rows
    # from before the preemption and ends at the last step; a restart from step 0 would repeat steps.
    steps = metric_steps(run_dir / "logs" / "metrics.csv")
    assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS - 1, steps
    assert steps[0] < stop_step, steps
    print(f"\nSLURM sweep: {len(REGISTERS)} tasks + 1 restart in {elapsed:.0f} s (preempted at step {stop_step})")

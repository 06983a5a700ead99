"""``python train/pretrain.py -m ... hydra/launcher=submitit_slurm`` on a real SLURM cluster (localhost): the
sweep becomes a SLURM array through hydra-submitit-launcher, one task is signalled mid-run, vitreg's
PreemptionHandler (the one requeue owner) checkpoints and requeues it, submitit runs the same Hydra job
again, it resumes, and the submitting process ends with the sweep summary.

Slow (a minute or two), like tests/slurm/test_slurm_sweep.py, whose cluster it uses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from tests.slurm.cluster import SlurmCluster, wait_until

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra: pip install 'vitreg[slurm]'")
REPO = Path(__file__).resolve().parents[2]
REGISTERS = [0, 2]
MAX_STEPS = 40
TIMEOUT_S = 300


@pytest.mark.slow
def test_submitit_sweep_with_preemption_and_requeue(slurm_cluster: SlurmCluster, tmp_path):
    cluster = slurm_cluster
    output_root = tmp_path / "out"
    cmd = [
        *(sys.executable, "train/pretrain.py", "-m", *TINY, f"registers={','.join(map(str, REGISTERS))}"),
        *(
            f"trainer.max_steps={MAX_STEPS}",
            "callbacks.checkpoint_every_n_steps=5",
            "callbacks.telemetry.enabled=false",
        ),
        *("trainer.log_every_n_steps=5", "logger=csv", f"paths.output_root={output_root}"),
        f"paths.cache_dir={tmp_path / 'cache'}",
        *("hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1"),
        "hydra.launcher.timeout_min=10",
    ]
    env = {**cluster.env, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = wait_until(
            lambda: next((d for d in (output_root / "demo").glob("registers=0,*") if (d / "checkpoints").is_dir()
                          and (d / "checkpoints" / "last.ckpt").exists()), None),
            TIMEOUT_S, "the first checkpoint of registers=0", cluster,
        )  # fmt: skip
        queue = cluster.run(["squeue", "-h", "-o", "%i %K %T"]).stdout.split()
        array_job = queue[0].split("_")[0]
        signalled = f"{array_job}_0"
        cluster.run(["scancel", "--signal=USR1", signalled])

        def requeued():
            records = [r for r in cluster.jobs(array_job) if r.get("ArrayTaskId") == "0"]
            return (
                records and records[0].get("Restarts") == "1" and records[0].get("JobState") in ("PENDING", "REQUEUED")
            )

        wait_until(requeued, 60, "the signalled task to be requeued", cluster)
        cluster.run(["scontrol", "update", f"JobId={signalled}", "StartTime=now"])  # no 121 s requeue delay
        out, _ = sweep.communicate(timeout=TIMEOUT_S)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, out[-4000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == MAX_STEPS
    logs = "\n".join(p.read_text() for p in sorted((output_root / "demo" / ".submitit").rglob(f"{signalled}_*log.out")))
    assert logs.count(f"requeue: SLURM job {signalled} requeued") == 1, logs[-4000:]
    assert f"resuming from {run_dir}/checkpoints/last.ckpt" in logs, logs[-4000:]
    start = out.index(f"sweep of {len(REGISTERS)} runs in ")
    rows = out[start:].splitlines()[2 : 2 + len(REGISTERS)]
    assert [row.split()[1:3] for row in rows] == [[str(r), str(MAX_STEPS)] for r in REGISTERS], out[start:]

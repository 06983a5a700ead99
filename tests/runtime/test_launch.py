"""How train/analyze.py finds its rank under torchrun and srun."""

from __future__ import annotations

import pytest

from vitreg.runtime.launch import first_host, process_env


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node7", "node7"), ("gpu[003-005,010]", "gpu003"), ("gpu[12,14],cpu1", "gpu12"), ("a-b[1-2]", "a-b1")],
)
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_single_process_by_default():
    info, extra = process_env({})
    assert (info.rank, info.world, info.local_rank, extra) == (0, 1, 0, {})


def test_torchrun_variables_win():
    info, extra = process_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "SLURM_NTASKS": "2"})
    assert (info.rank, info.world, info.local_rank) == (3, 8, 3) and extra == {}


def test_srun_tasks_become_ranks():
    env = {
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_JOB_ID": "123456",
    }
    info, extra = process_env(env)
    assert (info.rank, info.world, info.local_rank, info.is_main) == (9, 16, 1, False)
    assert extra == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_batch_script_without_srun_is_single_process():
    # the sbatch shell itself has SLURM_NTASKS but no step: it must not wait for 15 other ranks
    info, extra = process_env({"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu1"})
    assert info.world == 1 and extra == {}

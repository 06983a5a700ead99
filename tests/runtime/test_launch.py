"""How train/analyze.py finds its rank under torchrun and srun, and how pretraining refuses a launch
whose processes nobody starts."""

from __future__ import annotations

import time

import pytest

from tests.conftest import compose_config
from vitreg.config import ConfigError
from vitreg.runtime.launch import check_launcher, first_host, process_env


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


# --- check_launcher: a run that needs processes nobody starts fails at once, not after 30 minutes ---

SRUN_2x4 = {  # srun --nodes=2 --ntasks-per-node=4, rank 5
    "SLURM_JOB_ID": "123",
    "SLURM_JOB_NAME": "pretrain",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_NNODES": "2",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_ID": "0",
}
BATCH_SHELL_2x4 = {k: v for k, v in SRUN_2x4.items() if k not in ("SLURM_STEP_ID", "SLURM_LOCALID", "SLURM_NODEID")}
BATCH_SHELL_2x4["SLURM_PROCID"] = "0"
TORCHRUN_2x4 = {
    "TORCHELASTIC_RUN_ID": "abc",
    "WORLD_SIZE": "8",
    "RANK": "6",
    "LOCAL_RANK": "2",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize(
    ("num_nodes", "devices", "env"),
    [
        (1, 1, {}),  # one process
        (1, 4, {}),  # one machine: Lightning spawns the 4 processes itself
        (1, "auto", {}),
        (2, 4, SRUN_2x4),
        (2, "auto", {**SRUN_2x4, "SLURM_NTASKS": "16"}),  # devices not a count: the world is not checked
        (2, [0, 1, 2, 3], {**SRUN_2x4, "SLURM_NTASKS": "16"}),
        (2, -1, {**SRUN_2x4, "SLURM_NTASKS": "16"}),
        (2, 4, TORCHRUN_2x4),
        (2, 4, {k: v for k, v in TORCHRUN_2x4.items() if k != "TORCHELASTIC_RUN_ID"}),  # torchrun-style by hand
        (2, 4, {"NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}),  # Lightning's own multi-node
        (1, 1, {**BATCH_SHELL_2x4, "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1"}),
        (1, 1, {**BATCH_SHELL_2x4, "SLURM_JOB_NAME": "bash"}),  # salloc shell: Lightning ignores SLURM there
        (1, 2, {**SRUN_2x4, "SLURM_JOB_NAME": "interactive"}),  # srun --job-name=interactive: ignored as well
    ],
)
def test_launches_that_work_pass(num_nodes, devices, env):
    check_launcher(num_nodes, devices, env)


@pytest.mark.parametrize(
    ("num_nodes", "devices", "env", "key", "says"),
    [
        # the measured hang: 2 nodes asked, one machine, nothing starts the second process
        (
            2,
            1,
            {},
            "trainer.num_nodes",
            ["srun", "slurm/pretrain.sbatch", "torchrun --nnodes=2", "trainer.num_nodes=1"],
        ),
        (4, 8, {}, "trainer.num_nodes", ["--nproc_per_node=8", "--node_rank="]),
        # an interactive SLURM shell does not launch anything either
        (2, 4, {**BATCH_SHELL_2x4, "SLURM_JOB_NAME": "interactive"}, "trainer.num_nodes", ["srun"]),
        # python run straight in the sbatch script: SLURM promises 8 tasks, only this one exists
        (2, 4, BATCH_SHELL_2x4, "trainer.num_nodes", ["srun", "8 tasks"]),
        (1, 8, {**BATCH_SHELL_2x4, "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "8"}, "trainer.num_nodes", ["srun"]),
        # the launcher started another number of processes than the config expects
        (
            2,
            4,
            {**SRUN_2x4, "SLURM_NTASKS": "4"},
            "trainer.devices",
            ["4", "2 x 4 = 8", "--ntasks-per-node", "--nodes"],
        ),
        (2, 8, SRUN_2x4, "trainer.devices", ["8", "2 x 8 = 16"]),
        (1, 4, {**TORCHRUN_2x4, "WORLD_SIZE": "2"}, "trainer.devices", ["2", "1 x 4 = 4", "--nproc_per_node"]),
        (2, 2, TORCHRUN_2x4, "trainer.devices", ["8", "2 x 2 = 4"]),
    ],
)
def test_missing_launcher_or_world_mismatch_fails_at_once(num_nodes, devices, env, key, says):
    with pytest.raises(ConfigError) as err:
        check_launcher(num_nodes, devices, env)
    message = str(err.value)
    assert message.startswith(f"{key}: "), message
    for part in says:
        assert part in message, (part, message)


def test_check_launcher_reads_nothing_but_the_mapping_it_is_given(monkeypatch):
    # the process's own environment (a developer's shell under SLURM, say) must not change the verdict
    for name, value in SRUN_2x4.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError):
        check_launcher(2, 4, {})


def test_the_measured_hang_now_fails_at_start():
    # `train/pretrain.py experiment=demo trainer.num_nodes=2` on one machine waited in process-group init;
    # pretrain() calls check_launcher(cfg.trainer.num_nodes, cfg.trainer.devices, os.environ) first
    cfg = compose_config(["experiment=demo", "trainer.num_nodes=2", "trainer.max_steps=1"])
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^trainer\.num_nodes: 2 nodes"):
        check_launcher(cfg.trainer.num_nodes, cfg.trainer.devices, {})
    assert time.perf_counter() - start < 1.0

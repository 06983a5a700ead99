"""Process groups for the evaluation entry point, started by torchrun or by SLURM's srun.

Pretraining leaves this to Lightning; ``train/analyze.py`` is plain PyTorch, so it reads the same
environment itself: torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; under
``srun`` (one task per GPU) we derive them from ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
and the first host of ``SLURM_JOB_NODELIST``.

``check_launcher`` guards pretraining: a run whose processes nobody starts fails at once, naming
the launch to use, instead of waiting 30 minutes in process-group init.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vitreg.config import ConfigError
from vitreg.utils.distributed import is_initialized


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def process_env(env: Mapping[str, str] | None = None) -> tuple[ProcessInfo, dict[str, str]]:
    """This process's rank, world size and local rank, and the variables ``init_process_group`` still
    needs (empty when already set or single-process)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun, or a launcher that speaks its language
        info = ProcessInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        return info, {}
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    if ntasks > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # inside srun, not just sbatch
        info = ProcessInfo(int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)))
        extra = {"RANK": str(info.rank), "WORLD_SIZE": str(info.world), "LOCAL_RANK": str(info.local_rank)}
        extra["MASTER_ADDR"] = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        # a job-specific port, so two evaluations on one node do not collide
        extra["MASTER_PORT"] = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return info, extra
    return ProcessInfo(0, 1, 0), {}


def init_distributed(device: str | None = None) -> tuple[ProcessInfo, torch.device]:
    """Join the process group when started with several processes; pick this process's device.

    ``device`` null: the local GPU when CUDA is available, else the CPU (gloo)."""
    info, extra = process_env()
    os.environ.update(extra)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per process
        device = f"cuda:{info.local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.world > 1 and not is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=info.rank, world_size=info.world)
    return info, dev


def shutdown_distributed() -> None:
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --- Pretraining: refuse a launch whose processes nobody starts -----------------------------------
# Lightning waits (30 minutes, silently) in process-group init for ranks that never come. The
# detection below follows Lightning's own choice of cluster environment (TorchElastic, then SLURM,
# then its default one), so that it refuses nothing Lightning would run.


@dataclass(frozen=True)
class Launcher:
    name: str  # torchrun | srun | slurm batch shell | NODE_RANK/MASTER_ADDR
    world_size: int | None  # processes it started; None: Lightning derives it from the config


def lightning_sees_slurm(env: Mapping[str, str]) -> bool:
    """``SLURMEnvironment.detect()`` read from ``env``: SLURM tasks, unless the job is named
    ``bash`` or ``interactive`` (an ``salloc``/``srun --pty`` shell, which Lightning ignores)."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def detect_launcher(env: Mapping[str, str]) -> Launcher | None:
    """What started this process, as Lightning will see it; None: nothing (a plain ``python``)."""
    if "TORCHELASTIC_RUN_ID" in env or ("WORLD_SIZE" in env and "RANK" in env):
        return Launcher("torchrun", int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env else None)
    if lightning_sees_slurm(env):
        inside_srun = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env  # srun sets the step; the batch shell does not
        return Launcher("srun" if inside_srun else "slurm batch shell", int(env["SLURM_NTASKS"]))
    if "NODE_RANK" in env and "MASTER_ADDR" in env:  # Lightning's own multi-node launch, one command per node
        return Launcher("NODE_RANK/MASTER_ADDR", None)
    return None


def _device_count(devices: object) -> int | None:
    """``trainer.devices`` as a process count per node; None when Lightning resolves it (auto, -1, a list)."""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    return None


def _how_to_launch(num_nodes: int, devices: object) -> str:
    per_node = _device_count(devices) or "<GPUs per node>"
    return (
        f"on SLURM: sbatch --nodes={num_nodes} slurm/pretrain.sbatch <overrides> (srun starts one task per GPU); "
        f"elsewhere, on every node: torchrun --nnodes={num_nodes} --nproc_per_node={per_node} "
        "--node_rank=<0.. on each node> --master_addr=<node 0> --master_port=29500 train/pretrain.py <overrides>; "
        "on one machine: trainer.num_nodes=1"
    )


def check_launcher(num_nodes: int, devices: object, env: Mapping[str, str]) -> None:
    """Raise ``ConfigError`` when the processes this run needs will not all exist: several nodes
    without a launcher, a SLURM job whose tasks srun never started, or a launcher that started
    another number of processes than ``num_nodes x devices``. One machine without a launcher is
    fine: Lightning spawns its processes itself."""
    launcher = detect_launcher(env)
    if launcher is None:
        if num_nodes > 1:
            raise ConfigError(
                f"trainer.num_nodes: {num_nodes} nodes need a launcher that starts the processes on every "
                "node, and none started this one (no srun, torchrun or NODE_RANK + MASTER_ADDR): it would "
                f"wait 30 minutes for the others. Run {_how_to_launch(num_nodes, devices)}"
            )
        return
    if launcher.name == "slurm batch shell" and (launcher.world_size > 1 or num_nodes > 1):
        raise ConfigError(
            f"trainer.num_nodes: this SLURM job has {launcher.world_size} tasks but python was not started by "
            "srun, so Lightning would wait 30 minutes for the other ranks; start it with srun "
            f"(slurm/pretrain.sbatch does: sbatch --nodes={num_nodes} slurm/pretrain.sbatch <overrides>)"
        )
    per_node = _device_count(devices)
    if launcher.world_size is None or per_node is None or launcher.world_size == num_nodes * per_node:
        return
    raise ConfigError(
        f"trainer.devices: the launcher ({launcher.name}) started {launcher.world_size} processes, but "
        f"trainer.num_nodes x trainer.devices = {num_nodes} x {per_node} = {num_nodes * per_node}; make them "
        "agree: under SLURM --nodes = trainer.num_nodes and --ntasks-per-node = trainer.devices "
        "(slurm/pretrain.sbatch passes both), under torchrun --nnodes = trainer.num_nodes and "
        "--nproc_per_node = trainer.devices"
    )

"""Process groups for the evaluation entry point, started by torchrun or by SLURM's srun.

Pretraining leaves this to Lightning; ``train/analyze.py`` is plain PyTorch, so it reads the same
environment itself: torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; under
``srun`` (one task per GPU) we derive them from ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
and the first host of ``SLURM_JOB_NODELIST``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    if info.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=info.rank, world_size=info.world)
    return info, dev


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

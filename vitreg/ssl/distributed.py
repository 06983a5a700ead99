"""Collectives that degrade to no-ops when ``torch.distributed`` is not initialised.

The SSL code calls these unconditionally, so the same function serves a single CPU process, a test with
gloo ranks and a multi-GPU NCCL run.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group (1 without distributed)."""
    return dist.get_world_size() if is_dist() else 1


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place and return it; unchanged without distributed."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average a floating-point ``t`` over ranks in place and return it.

    Sum then divide, because gloo has no ``ReduceOp.AVG``.
    """
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t

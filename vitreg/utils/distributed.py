"""Every collective vitreg calls, written so one process (no process group) is the trivial case.

Two families, kept apart on purpose because their callers rely on the difference:

* ``all_reduce_(t, op)`` reduces ONE tensor in place on its own device and returns it, with autograd
  left as it is. The SSL losses call it on the hot path (``q /= all_reduce_(q.sum(), "sum")``); ``"mean"``
  is a sum then an in-place division, because gloo has no ``ReduceOp.AVG``.
* ``all_reduce_many_``, ``broadcast_``, ``gather_rows`` and ``all_gather_cat`` take tensors wherever they
  live (CPU counts under nccl included): the tensors travel on the backend's device (the current GPU under
  nccl) and come back on the caller's. ``all_reduce_many_`` packs same-dtype tensors into one flat buffer
  (one collective for many small statistics) and, like ``broadcast_``, runs under ``no_grad``.

Besides: ``rank_and_world``, ``gather_objects`` (picklable objects) and ``broadcast_module_`` (weights
and buffers over a subgroup). Joining and leaving the process group is ``vitreg.runtime.launch``'s job.
Everything works with gloo on CPU tensors and with nccl on CUDA tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

_MAX_DIMS = 8  # trailing dimensions a gathered tensor may have (shape metadata travels in a fixed-size tensor)
_REDUCE_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}  # mean: sum, then divide


def is_initialized() -> bool:
    """Whether a default process group exists (it may have a single rank)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(*, launcher_env: bool = False) -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one.

    ``launcher_env``: without a process group, read the launcher's variables instead, RANK/WORLD_SIZE
    (torchrun), else SLURM_PROCID/SLURM_NTASKS (srun). For data streams, which may be built where no
    group is joined (a spawned worker, a datamodule set up before the strategy) yet must take their
    rank's share. Never for deciding whether to call a collective: that needs the group itself.
    """
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launcher_env:
        for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_key in os.environ and world_key in os.environ:
                return int(os.environ[rank_key]), int(os.environ[world_key])
    return 0, 1


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return rank_and_world()[1] > 1


def _comm_device() -> torch.device:
    """Where tensors must live for the collectives: the current CUDA device under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_op(op: str) -> dist.ReduceOp:
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    return getattr(dist.ReduceOp, _REDUCE_OPS[op])


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """Reduce ``t`` over ranks in place on its own device (``"sum"``, ``"mean"``, ``"max"``, ``"min"``)
    and return it; unchanged without a process group. ``"mean"`` needs a floating-point ``t``."""
    reduce_op = _reduce_op(op)
    if is_initialized():
        dist.all_reduce(t, op=reduce_op)
        if op == "mean":
            t.div_(dist.get_world_size())
    return t


@torch.no_grad()
def all_reduce_many_(tensors: Sequence[Tensor], op: str = "sum") -> None:
    """In-place all-reduce (``"sum"``, ``"mean"``, ``"max"`` or ``"min"``) of every tensor, one collective
    per dtype. An integer mean rounds down."""
    reduce_op = _reduce_op(op)
    _, world = rank_and_world()
    if world == 1 or not tensors:
        return
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:  # one flat buffer needs one dtype
        for t in tensors:
            all_reduce_many_([t], op)
        return
    device = _comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors])
    dist.all_reduce(flat, op=reduce_op)
    if op == "mean":
        flat = flat / world if flat.is_floating_point() else flat // world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def average_gradients_(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` of ``params`` over ranks (in place), like DDP's all-reduce.

    Every rank must pass the same parameters in the same order. A parameter without a gradient on this
    rank takes part with zeros (its ``.grad`` becomes a zero tensor), so the collective never hangs.
    """
    params = [p for p in params if p.requires_grad]
    if not is_distributed() or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_many_([p.grad for p in params], "mean")


@torch.no_grad()
def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite every tensor with rank ``src``'s values (in place), e.g. to start classifiers identical."""
    if not is_distributed():
        return
    device = _comm_device()
    for t in tensors:
        buffer = t.detach().to(device).contiguous()
        dist.broadcast(buffer, src)
        t.copy_(buffer)


@torch.no_grad()
def broadcast_module_(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Every rank of ``group`` takes the weights and buffers of the group's first rank, in place, on their
    own device (DINOv2's ``sync_module_states=True``). A collective for every rank of the group."""
    src = dist.get_global_rank(group, 0)
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src, group=group)


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, on every rank.

    Ranks may hold different numbers of rows (zero included): rows are padded to the longest, gathered,
    and the padding dropped. A rank with no rows may pass any empty tensor of the right dtype (e.g.
    ``torch.empty(0)``); it takes the trailing shape from the other ranks.
    """
    rank, world = rank_and_world()
    if world == 1:
        return t
    if t.dim() > 1 + _MAX_DIMS:
        raise ValueError(f"gather_rows handles at most {1 + _MAX_DIMS} dimensions, got a {t.dim()}-d tensor")
    device = _comm_device()
    # [rows, ndim, *trailing shape (zero-padded)], so an empty rank learns the shape of the others
    meta = torch.zeros(2 + _MAX_DIMS, dtype=torch.long)
    meta[0], meta[1] = t.shape[0] if t.dim() else 0, max(t.dim() - 1, 0)
    meta[2 : 1 + t.dim()] = torch.tensor(t.shape[1:], dtype=torch.long)
    metas = [torch.zeros_like(meta, device=device) for _ in range(world)]
    dist.all_gather(metas, meta.to(device))
    metas = [m.cpu() for m in metas]
    counts = [int(m[0]) for m in metas]
    shapes = {tuple(int(s) for s in m[2 : 2 + int(m[1])]) for m, n in zip(metas, counts, strict=True) if n > 0}
    if len(shapes) > 1:
        raise ValueError(f"gather_rows: ranks hold rows of different shapes {sorted(shapes)}")
    if not shapes:  # nothing anywhere: keep the local (empty) tensor
        return t
    trailing = shapes.pop()
    longest = max(counts)
    padded = torch.zeros((longest, *trailing), dtype=t.dtype, device=device)
    if counts[rank]:
        padded[: counts[rank]] = t.to(device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:n] for p, n in zip(pieces, counts, strict=True)]).to(t.device)


def all_gather_cat(t: Tensor, dim: int = 0) -> Tensor:
    """Every rank's ``t`` (same shape on all ranks) concatenated along ``dim`` in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return t
    device = _comm_device()
    local = t.to(device).contiguous()
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local)
    return torch.cat(pieces, dim=dim).to(t.device)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order, on every rank (``[obj]`` with a single rank)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out

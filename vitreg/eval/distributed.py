"""The few collectives evaluation needs, written so one process (no process group) is the trivial case.

Evaluation data is split by sample: sample ``i`` of a source is read by rank ``i % world`` only, so the
ranks together see every sample exactly once (no padding, no duplicates, unlike ``DistributedSampler``).
``gather_in_order`` undoes that split. Every helper works with gloo on CPU tensors and with nccl on CUDA
tensors: tensors travel on the backend's device and come back on the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

_MAX_DIMS = 8  # trailing dimensions a gathered tensor may have (shape metadata travels in a fixed-size tensor)


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return rank_world()[1] > 1


def _comm_device() -> torch.device:
    """Where tensors must live for the collectives: the current CUDA device under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, on every rank.

    Ranks may hold different numbers of rows (zero included): rows are padded to the longest, gathered,
    and the padding dropped. A rank with no rows may pass any empty tensor of the right dtype (e.g.
    ``torch.empty(0)``); it takes the trailing shape from the other ranks.
    """
    rank, world = rank_world()
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


def gather_in_order(t: Tensor, indices: Tensor | None = None) -> Tensor:
    """The full tensor in source order on every rank, from each rank's rows.

    Without ``indices``: rank ``r`` holds the rows of samples ``i ≡ r (mod world)`` in increasing ``i``
    (the split of ``vitreg.eval.data``), so row ``j`` of rank ``r`` is sample ``j·world + r``. With
    ``indices`` (the sample index of each local row, any order): the gathered rows are sorted by index,
    which also handles holes (samples skipped as unreadable). Indices must be unique across ranks.
    """
    _, world = rank_world()
    if indices is not None:
        if len(indices) != len(t):
            raise ValueError(f"gather_in_order: {len(indices)} indices for {len(t)} rows")
        all_indices = gather_rows(indices.to(torch.long))
        order = torch.argsort(all_indices.cpu(), stable=True)
        ordered = all_indices.cpu()[order]
        if len(ordered) > 1 and bool((ordered[1:] == ordered[:-1]).any()):
            dup = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
            raise ValueError(f"gather_in_order: sample {dup} is held by more than one rank (or twice by one)")
        return gather_rows(t)[order.to(t.device)]
    if world == 1:
        return t
    gathered = gather_rows(t)
    counts = gather_rows(torch.tensor([len(t)], dtype=torch.long)).tolist()
    total = sum(counts)
    expected = [len(range(r, total, world)) for r in range(world)]
    if counts != expected:
        raise ValueError(
            f"gather_in_order: ranks hold {counts} rows, but a strided split of {total} samples gives {expected}; "
            "pass the sample indices when samples may be missing"
        )
    out = torch.empty_like(gathered)
    start = 0
    for r, n in enumerate(counts):
        out[r::world] = gathered[start : start + n]
        start += n
    return out


@torch.no_grad()
def all_reduce_(tensors: Sequence[Tensor], op: str = "sum") -> None:
    """In-place all-reduce (``"sum"``, ``"mean"``, ``"max"`` or ``"min"``) of every tensor, one collective."""
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    _, world = rank_world()
    if world == 1 or not tensors:
        return
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:  # one flat buffer needs one dtype
        for t in tensors:
            all_reduce_([t], op)
        return
    device = _comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors])
    dist.all_reduce(flat, op=ops[op])
    if op == "mean":
        flat = flat / world if flat.is_floating_point() else flat // world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Replace every tensor by its mean over ranks (in place)."""
    all_reduce_(tensors, "mean")


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Replace every tensor by its sum over ranks (in place)."""
    all_reduce_(tensors, "sum")


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
    all_reduce_mean_([p.grad for p in params])


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


def all_gather_cat(t: Tensor, dim: int = 0) -> Tensor:
    """Every rank's ``t`` (same shape on all ranks) concatenated along ``dim`` in rank order, on every rank."""
    _, world = rank_world()
    if world == 1:
        return t
    device = _comm_device()
    local = t.to(device).contiguous()
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local)
    return torch.cat(pieces, dim=dim).to(t.device)

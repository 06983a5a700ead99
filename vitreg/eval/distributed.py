"""Evaluation's sample split undone: ``gather_in_order`` puts every rank's rows back in source order.

Evaluation data is split by sample: sample ``i`` of a source is read by rank ``i % world`` only, so the
ranks together see every sample exactly once (no padding, no duplicates, unlike ``DistributedSampler``).
The collectives themselves live in ``vitreg.utils.distributed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitreg.utils.distributed import gather_rows, rank_and_world


def gather_in_order(t: Tensor, indices: Tensor | None = None) -> Tensor:
    """The full tensor in source order on every rank, from each rank's rows.

    Without ``indices``: rank ``r`` holds the rows of samples ``i ≡ r (mod world)`` in increasing ``i``
    (the split of ``vitreg.eval.data``), so row ``j`` of rank ``r`` is sample ``j·world + r``. With
    ``indices`` (the sample index of each local row, any order): the gathered rows are sorted by index,
    which also handles holes (samples skipped as unreadable). Indices must be unique across ranks.
    """
    _, world = rank_and_world()
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

"""Teacher targets for the DINO and iBOT losses: softmax with a running center, or Sinkhorn-Knopp.

Both are computed in fp32 without gradients. Rows are samples (CLS tokens or masked patch tokens), columns are
the K prototypes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitreg.utils.distributed import all_reduce_, rank_and_world


class Centering(nn.Module):
    """Sharpened softmax of the teacher logits after subtracting a running mean (``center``, shape (1, K)).

    One instance serves the DINO CLS targets and another the iBOT patch targets.

    Call order each step: ``targets(t, temp)`` first, then ``stage_update(t)``, and ``commit()`` once
    the step is accepted (``discard()`` when it is skipped, so a non-finite batch never reaches the
    centre); ``update(t)`` is stage + commit. DINOv2 starts the update's all-reduce asynchronously and
    applies it lazily at the start of the *next* ``softmax_center_teacher`` call. Computing the targets
    with the current center and committing the update before the next step is numerically the same:
    step 0 uses center 0 and step i uses a center built from batches 0..i-1 in both schemes. The only
    visible difference is between steps, where our ``center`` already includes the last batch.
    """

    center: Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))
        self._next_center: Tensor | None = None  # staged by stage_update, not a buffer: never checkpointed

    @property
    def next_center(self) -> Tensor:
        """The centre once the staged update is committed (the current one when nothing is staged)."""
        return self.center if self._next_center is None else self._next_center

    @torch.no_grad()
    def targets(self, teacher_logits: Tensor, temp: float) -> Tensor:
        """``softmax((t - center) / temp)`` over the last dim, in fp32."""
        return torch.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def stage_update(self, teacher_logits: Tensor, valid: Tensor | None = None, n_valid: int | None = None) -> None:
        """Compute ``m * center + (1 - m) * batch_mean``, with the mean taken over all ranks, and hold it
        until ``commit()``.

        The batch mean is the average of the per-rank row means. For DINO (2B rows on every rank) this
        equals DINOv2's ``sum(t) / (n * world)``; for iBOT, where ranks hold different numbers of masked
        tokens, DINOv2 also averages per-rank means, so it is not the mean over all masked tokens.
        Every rank must call this (it is a collective). A rank with no rows (a batch whose iBOT masks
        happen to be empty: possible on tiny grids) is left out of the average, and when no rank has
        a row the centre stays unchanged; DINOv2 would divide by zero and poison the centre with NaN.

        Padded rows (iBOT's static shape) are left out: ``valid`` marks the real rows, ``n_valid`` counts
        them (a host int, so no sync).
        """
        rows = teacher_logits.shape[0] if valid is None else n_valid
        local = torch.zeros(1, self.center.shape[-1] + 1, device=self.center.device)
        if rows:
            logits = teacher_logits.detach().float()
            if valid is None:
                local[:, :-1] = logits.mean(dim=0, keepdim=True)
            else:
                local[:, :-1] = torch.where(valid[:, None], logits, 0.0).sum(dim=0, keepdim=True) / rows
            local[:, -1] = 1.0
        all_reduce_(local, "sum")  # sum of the per-rank means, and the number of ranks that had rows
        ranks_with_rows = local[:, -1:]
        batch_mean = local[:, :-1] / ranks_with_rows.clamp_min(1.0)
        moved = self.center.mul(self.momentum).add(batch_mean, alpha=1.0 - self.momentum)
        # decided on the device: no host sync on the training step
        self._next_center = torch.where(ranks_with_rows > 0, moved, self.center)

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the staged update (nothing staged: no change)."""
        if self._next_center is not None:
            self.center.copy_(self._next_center)
        self._next_center = None

    def discard(self) -> None:
        """Drop the staged update: the step that computed it was skipped."""
        self._next_center = None

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """``stage_update`` then ``commit``: for callers that never skip a step."""
        self.stage_update(teacher_logits)
        self.commit()


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temp: float,
    n_iterations: int = 3,
    total_count: int | Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """DINOv2's distributed Sinkhorn-Knopp: (n, K) logits -> (n, K) targets whose rows sum to 1.

    ``total_count`` is the number of rows over all ranks (B in the paper). It defaults to ``n * world_size``,
    right for the DINO CLS targets; for iBOT pass the global number of masked tokens (already all-reduced),
    since ranks hold different counts. Prototype (column) sums are all-reduced, sample sums are local.
    B must be the same on every rank: it sets each sample's mass 1/B, so the weight of a rank's samples in
    the all-reduced prototype sums. In a single process it is only a scale that the final ``Q *= B`` undoes.

    As in DINOv2 there is no max-subtraction before ``exp``: the logits are bounded because the head
    L2-normalises its input and its prototypes have norm ``weight_g`` (about 1).

    ``valid`` (n,) bool marks real rows when the input is padded to a static shape (iBOT): padded rows take
    no mass, stay out of every sum and come back as all-zero targets.
    """
    q = torch.exp(teacher_logits.float() / temp).t()  # (K, n), the paper's layout
    if valid is not None:
        q = torch.where(valid, q, 0.0)
    k = q.shape[0]
    if total_count is None:
        total_count = q.shape[1] * rank_and_world()[1]
    # A device scalar (as DINOv2): dividing a CUDA tensor by a Python number multiplies by its reciprocal,
    # which rounds differently. new_full fills on the device: no blocking copy of the int.
    if isinstance(total_count, Tensor):
        b = torch.as_tensor(total_count, dtype=torch.float32, device=q.device).reshape(())
    else:
        b = q.new_full((), total_count)

    q /= all_reduce_(q.sum(), "sum")
    for _ in range(n_iterations):
        # each prototype gets total mass 1/K over the global batch
        q /= all_reduce_(q.sum(dim=1, keepdim=True), "sum")
        q /= k
        # each sample gets mass 1/B
        per_sample = q.sum(dim=0, keepdim=True)
        q /= per_sample if valid is None else torch.where(valid, per_sample, 1.0)  # a padded column stays 0
        q /= b
    q *= b  # columns now sum to 1: one assignment per sample
    if valid is not None:  # no real row on any rank: 0/0 above; padded targets are zeros whatever happened
        q = torch.where(valid, q, 0.0)
    return q.t()

"""The DINOv2 objectives: DINO (CLS), iBOT (masked patches) and the KoLeo regulariser.

All are computed in fp32 whatever the input dtype, and each returns the value that is *optimised*.
DINOv2 logs ``koleo_loss`` and ``ibot_loss`` at half their optimised values (``loss_dict[...] = x / 2``
in ``ssl_meta_arch.py``), so its logged total is not its optimised loss. To compare with DINOv2 logs:
logged koleo = ``koleo_weight * (koleo_loss(view0) + koleo_loss(view1)) / 2`` and logged ibot =
``ibot_loss(...) / 2``; the two DINO terms are logged as optimised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

N_GLOBAL_CROPS = 2  # DINOv2 asserts exactly two global crops


def cross_entropy_to_targets(student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1) -> Tensor:
    """Per-row ``-sum_k t_k * log_softmax(s / student_temp)_k``, shape (n,)."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


def dino_loss(
    student_global: Tensor,
    student_local: Tensor | None,
    teacher_probs: Tensor,
    student_temp: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """DINO loss on head outputs, split as DINOv2 logs it: ``(dino_local_crops_loss, dino_global_crops_loss)``.

    Every tensor is crop-major: ``student_global`` (2B, K) = [view0 rows; view1 rows], ``student_local``
    (L·B, K) = L chunks of B rows, ``teacher_probs`` (2B, K) = [t(view0); t(view1)] (*not* swapped: the
    pairing is done here). Each term is a batch-mean cross-entropy, and both parts are divided by the total
    number of terms ``2·(2-1) + 2·L`` (18 for L=8), so their sum is the average over all cross-view pairs:
    - local: every local crop against both teacher views (2·L terms);
    - global: student view0 against teacher view1 and view1 against view0 (no same-view term).
    """
    if teacher_probs.shape[0] % N_GLOBAL_CROPS or student_global.shape != teacher_probs.shape:
        raise ValueError(
            f"student_global {tuple(student_global.shape)} and teacher_probs {tuple(teacher_probs.shape)} "
            "must both be (2B, K)"
        )
    t0, t1 = teacher_probs.float().chunk(N_GLOBAL_CROPS)
    batch = t0.shape[0]
    n_local = 0 if student_local is None else student_local.shape[0] // batch
    if student_local is not None and (n_local == 0 or student_local.shape[0] != n_local * batch):
        raise ValueError(f"student_local has {student_local.shape[0]} rows, not a multiple of B={batch}")
    n_terms = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) + N_GLOBAL_CROPS * n_local

    s0, s1 = student_global.chunk(N_GLOBAL_CROPS)
    global_loss = (
        cross_entropy_to_targets(s0, t1, student_temp).mean() + cross_entropy_to_targets(s1, t0, student_temp).mean()
    ) / n_terms

    if student_local is None:
        return global_loss.new_zeros(()), global_loss
    # CE is linear in the target, so the two views of one local crop take one log_softmax: CE(t0) + CE(t1) = CE(t0 + t1).
    both_views = t0 + t1
    local_loss = sum(cross_entropy_to_targets(s, both_views, student_temp).mean() for s in student_local.chunk(n_local))
    return local_loss / n_terms, global_loss


def ibot_loss(
    student_patch_logits: Tensor,
    teacher_probs: Tensor,
    masks_weight: Tensor,
    n_images: int,
    student_temp: float = 0.1,
) -> Tensor:
    """iBOT loss on the M masked patch tokens: ``sum_i w_i * CE_i / n_images``.

    ``masks_weight[i]`` is 1 / (number of masked tokens in token i's image), so each image contributes the
    mean CE over its masked tokens; ``n_images`` is all global crops (2B) on this rank, including those with
    no mask, as in DINOv2's ``forward_masked``.
    """
    if not student_patch_logits.shape == teacher_probs.shape or masks_weight.shape != student_patch_logits.shape[:1]:
        raise ValueError(
            f"expected (M, K), (M, K), (M,); got {tuple(student_patch_logits.shape)}, "
            f"{tuple(teacher_probs.shape)}, {tuple(masks_weight.shape)}"
        )
    ce = cross_entropy_to_targets(student_patch_logits, teacher_probs, student_temp)
    return (ce * masks_weight.float()).sum() / n_images


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser ``-mean_i log(d_i + eps)``, d_i the distance from x_i to its nearest other row.

    Rows are L2-normalised first; this runs on one rank's (n, D) batch, with no gather, as in DINOv2.
    Unlike DINOv2 (which keeps the input dtype, fp16 under FSDP, where eps underflows to 0), everything runs
    in fp32: ``d = ||x_i - x_nn + eps||`` (``nn.PairwiseDistance``'s definition) is then at least
    ``eps·sqrt(D) > 0``, so duplicate rows give a large but finite loss and finite gradients.
    With fewer than two rows there is no neighbour, and a zero that keeps ``x`` in the graph is returned.
    """
    if x.shape[0] < 2:
        return x.float().sum() * 0.0
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            # max inner product = min distance on the sphere. DINOv2 fills the diagonal with -1; -inf is the
            # same except that a row can never pick itself when another row sits at dot <= -1 (antipodal).
            dots = x @ x.t()
            self_mask = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
            nearest = dots.masked_fill(self_mask, float("-inf")).argmax(dim=1)
        dist = (x - x[nearest] + eps).norm(p=2, dim=-1)
        return -torch.log(dist + eps).mean()

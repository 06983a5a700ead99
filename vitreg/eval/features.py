"""Frozen-backbone features for the probes: final-norm CLS of the last blocks and the mean patch token.

What DINOv2's linear evaluation feeds its classifiers (``get_intermediate_layers(n, return_class_token=True)``,
final norm applied to every block's output) and its kNN (the last block's final-norm CLS). Patch tokens
never include registers: the backbone's ``get_intermediate_layers`` drops them, so the patch mean is over
image patches only.

``extract_features`` runs a loader of ``(images, labels, indices)`` batches (``vitreg.eval.data``) and
puts every rank's rows back in source order, so the result is the same for any world size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vitreg.eval.distributed import gather_in_order
from vitreg.eval.progress import track
from vitreg.utils.distributed import all_reduce_many_, rank_and_world


@dataclass
class Features:
    """Features of a labelled set, one row per sample in source order.

    ``indices`` are the samples' positions in the source (rows of skipped, unreadable samples are absent,
    so they need not be ``0..N-1``); ``skipped`` counts those, by reason (over all ranks when gathered).
    """

    cls: Tensor  # (N, n_blocks, D) float32: final-norm CLS of the last n_blocks blocks (oldest first)
    patch_mean: Tensor  # (N, D) float32: mean of the last block's final-norm patch tokens (registers excluded)
    labels: Tensor  # (N,) long
    indices: Tensor | None = None  # (N,) long
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def backbone_features(backbone: nn.Module, images: Tensor, n_blocks: int = 1) -> tuple[Tensor, Tensor]:
    """``(cls (B, n_blocks, D), patch_mean (B, D))`` in float32 from ``get_intermediate_layers``.

    Runs in the backbone's current mode and autocast context (set them outside). The patch mean is
    taken in float32 (DINOv2 averages in the autocast dtype, then casts).
    """
    outputs = backbone.get_intermediate_layers(images, n_blocks, return_class_token=True, norm=True)
    cls = torch.stack([class_token.float() for _, class_token in outputs], dim=1)
    patch_mean = outputs[-1][0].float().mean(dim=1)
    return cls, patch_mean


def linear_input(cls: Tensor, patch_mean: Tensor, n_blocks: int, avgpool: bool) -> Tensor:
    """DINOv2's ``create_linear_input``: the CLS tokens of the last ``n_blocks`` blocks concatenated (oldest
    first), then, with ``avgpool``, the last block's patch mean. ``cls`` is ``(B, n, D)`` with
    ``n >= n_blocks``; returns float32 ``(B, (n_blocks + avgpool) * D)``."""
    if cls.dim() != 3:
        raise ValueError(f"cls must be (B, n_blocks, D), got shape {tuple(cls.shape)}")
    if not 1 <= n_blocks <= cls.shape[1]:
        raise ValueError(f"n_blocks={n_blocks} but the features hold the CLS of {cls.shape[1]} block(s)")
    parts = [cls[:, -n_blocks:].reshape(cls.shape[0], -1)]
    if avgpool:
        parts.append(patch_mean.reshape(cls.shape[0], -1))
    return torch.cat(parts, dim=1).float()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _unpack(batch, position: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(images, labels, indices)``; a 2-tuple batch gets running indices (one process only)."""
    if len(batch) >= 3:
        return batch[0], torch.as_tensor(batch[1]), torch.as_tensor(batch[2])
    if rank_and_world()[1] > 1:
        raise ValueError(
            "extract_features needs (images, labels, indices) batches when distributed, to put the ranks' samples "
            "back in order; use vitreg.eval.data.eval_loader"
        )
    images, labels = batch
    return images, torch.as_tensor(labels), torch.arange(position, position + len(images))


def _dataset_skips(loader) -> dict[str, int]:
    skipped = getattr(getattr(loader, "dataset", None), "skipped", None)
    return dict(skipped) if isinstance(skipped, dict) else {}


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader,
    *,
    n_blocks: int = 1,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    gather: bool = True,
    desc: str = "features",
) -> Features:
    """Features of every sample of ``loader`` (batches ``(images, labels, indices)``), on the CPU.

    The backbone runs in eval mode (its mode is restored after) under ``no_grad`` and, with
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on GPU), autocast. With ``gather`` (default) every rank
    gets all samples in source order, identical for any world size; ``gather=False`` keeps this rank's
    samples (sorted by index), e.g. for a rank-sharded kNN bank. ``desc`` names the loop in the progress
    report (``vitreg.eval.progress``).
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    cls_rows, mean_rows, label_rows, index_rows = [], [], [], []
    seen = 0
    try:
        for batch in track(loader, desc):
            images, labels, indices = _unpack(batch, seen)
            seen += len(images)
            with _autocast(device, autocast_dtype):
                cls, patch_mean = backbone_features(backbone, images.to(device, non_blocking=True), n_blocks)
            cls_rows.append(cls.cpu())
            mean_rows.append(patch_mean.cpu())
            label_rows.append(labels.long().cpu())
            index_rows.append(indices.long().cpu())
    finally:
        backbone.train(was_training)

    empty = torch.empty(0)
    cls = torch.cat(cls_rows) if cls_rows else empty
    patch_mean = torch.cat(mean_rows) if mean_rows else empty
    labels = torch.cat(label_rows) if label_rows else empty.long()
    indices = torch.cat(index_rows) if index_rows else empty.long()
    order = torch.argsort(indices, stable=True)  # loader workers interleave their batches
    cls, patch_mean, labels, indices = cls[order], patch_mean[order], labels[order], indices[order]
    skipped = _dataset_skips(loader)
    if gather:
        cls, patch_mean, labels, new_indices = (gather_in_order(t, indices) for t in (cls, patch_mean, labels, indices))
        indices = new_indices
    reasons = sorted(skipped)  # every rank's dataset lists the same reasons (see LabelledImages.skipped)
    if gather and reasons and rank_and_world()[1] > 1:
        counts = torch.tensor([skipped[r] for r in reasons], dtype=torch.long)
        all_reduce_many_([counts], "sum")
        skipped = dict(zip(reasons, counts.tolist(), strict=True))
    return Features(cls=cls, patch_mean=patch_mean, labels=labels, indices=indices, skipped=skipped)

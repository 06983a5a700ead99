"""Register neurons (Jiang et al., "Vision Transformers Don't Need Trained Registers", NeurIPS 2025, Alg. 1):
the FFN hidden units (after the nonlinearity, SwiGLU's ``silu(x1) * x2`` too) whose mean |activation| at the
outlier (high-norm) patch positions is large; they write the high norms there.

The scoring core lives here, shared by the training telemetry (``register_neuron_record``, every
measurement) and the evaluation ``vitreg.eval.register_neurons`` (task=register_neurons): given each probe
image's outlier patches, one pass through blocks ``0..highest`` reduces every FFN's activations as the
backbone's ``iter_layers`` yields them, so no block's per-token activations outlive it.

Neurons are named by ``layer`` = the index of their block (0-based) and ``neuron`` = the hidden unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The paper's DINOv2-L (24 blocks) setting searches blocks 0..17; other depths keep the proportion.
PAPER_DEPTH, PAPER_HIGHEST = 24, 17
SMALL_ACTIVATION = 0.5  # the paper's sparsity filter: |activation| below this on at least half the tokens


def default_highest_block(depth: int) -> int:
    """The last block searched when none is given: round(depth * 17 / 24) (17 for ViT-L)."""
    return min(depth - 1, round(depth * PAPER_HIGHEST / PAPER_DEPTH))


def resolve_highest_block(model: nn.Module, highest_layer: int | None, name: str) -> int:
    """``highest_layer`` as a block index (``None``: the paper's proportion); ``name`` is the setting, for errors."""
    if highest_layer is None:
        return default_highest_block(model.n_blocks)
    return model.resolve_block(highest_layer, name)


@dataclass
class NeuronActivity:
    """Per (block, neuron) sums over the probe images, blocks ``0..highest``; see ``neuron_activity``."""

    at_outliers: Tensor  # (blocks, hidden) sum over images of the mean |act| over the image's outlier patches
    elsewhere: Tensor  # (blocks, hidden) sum over images of the mean |act| over the image's other patches
    small: Tensor  # (blocks, hidden) patch tokens with |act| < SMALL_ACTIVATION
    images_with_outliers: int
    num_images: int
    tokens_seen: int  # patch tokens seen per neuron

    def score(self) -> Tensor:
        """Mean |activation| at the outliers, averaged over the images that have outliers."""
        return self.at_outliers / max(self.images_with_outliers, 1)

    def ratio(self) -> Tensor:
        """``score`` over the mean |activation| on the other patches (averaged over all images)."""
        return self.score() / (self.elsewhere / self.num_images).clamp(min=1e-12)

    def sparse(self) -> Tensor:
        """The paper's sparsity filter: small on at least half of the patch tokens."""
        return self.small / max(self.tokens_seen, 1) >= 0.5


@torch.no_grad()
def neuron_activity(model: nn.Module, chunks: Iterable[tuple[Tensor, Tensor]], highest: int) -> NeuronActivity:
    """Reduce the FFN activations of blocks ``0..highest`` over ``chunks`` of (normalised images (B, 3, H, W),
    their patch-outlier mask (B, P) bool), both on the model's device. The caller chooses eval mode."""
    patches = model.layout.patches
    at_outliers = elsewhere = small = None  # (blocks, hidden), sized at the first FFN seen
    images_with_outliers = num_images = tokens_seen = 0
    for x, mask in chunks:
        # the mean over an image's outliers: a zero row for an image without any, so it adds nothing below
        at = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)
        normal = (~mask).float() / (~mask).sum(1, keepdim=True).clamp(min=1)
        for layer in model.iter_layers(x, mlp=True, upto=highest + 1):
            if layer.index == 0:
                continue
            acts = patches(layer.mlp_hidden).float().abs()  # (B, P, hidden): one block at a time
            if at_outliers is None:
                at_outliers = torch.zeros(highest + 1, acts.shape[-1])
                elsewhere, small = torch.zeros_like(at_outliers), torch.zeros_like(at_outliers)
            block = layer.index - 1
            at_outliers[block] += torch.einsum("bp,bph->h", at, acts).cpu()
            elsewhere[block] += torch.einsum("bp,bph->h", normal, acts).cpu()
            small[block] += (acts < SMALL_ACTIVATION).float().sum((0, 1)).cpu()
        images_with_outliers += int(mask.any(1).sum())
        num_images += mask.shape[0]
        tokens_seen += mask.numel()
    if at_outliers is None:
        raise ValueError("neuron_activity needs at least one chunk of images")
    return NeuronActivity(at_outliers, elsewhere, small, images_with_outliers, num_images, tokens_seen)


def top_neurons(activity: NeuronActivity, top_k: int, by: str = "score", sparse_only: bool = False) -> list[dict]:
    """The ``top_k`` neurons by ``score`` or ``ratio``, best first: ``[{"layer", "neuron", "score", "ratio"}]``
    (``layer`` = block index). Empty when no image has an outlier; non-finite values never rank or appear."""
    if not activity.images_with_outliers:
        return []
    score, ratio = activity.score(), activity.ratio()
    key = {"score": score, "ratio": ratio}[by].clone()
    keep = torch.isfinite(score) & torch.isfinite(ratio)
    if sparse_only:
        keep &= activity.sparse()
    key[~keep] = -math.inf
    count = min(top_k, int(keep.sum()))
    top = key.flatten().topk(count).indices
    width = score.shape[1]
    return [
        {
            "layer": int(i) // width,
            "neuron": int(i) % width,
            "score": float(score.flatten()[i]),
            "ratio": float(ratio.flatten()[i]),
        }
        for i in top
    ]


def top_k_overlap(current: list[dict], previous: list[dict] | None) -> float | None:
    """|current ∩ previous| / k over (layer, neuron) pairs, k the larger list's length; None when either is
    empty or missing (no outliers, or the first measurement)."""
    if not current or not previous:
        return None
    now = {(n["layer"], n["neuron"]) for n in current}
    before = {(n["layer"], n["neuron"]) for n in previous}
    return len(now & before) / max(len(now), len(before))


def scored_images(outliers: Tensor, limit: int | None) -> Tensor:
    """Indices of the probe images the telemetry's neuron pass scores: every image (``limit`` None), or the
    first ``limit`` that have outliers (the others add nothing at the outliers; this bounds the pass's cost)."""
    if limit is None:
        return torch.arange(outliers.shape[0])
    return outliers.any(1).nonzero().flatten()[:limit]


@torch.no_grad()
def register_neuron_record(
    model: nn.Module,
    images: Callable[[Tensor], Iterable[Tensor]],
    outliers: Tensor,
    outlier_block: int,
    highest: int,
    top_k: int,
    num_images: int | None = None,
) -> dict:
    """The telemetry statistic: the ``top_k`` neurons of blocks ``0..highest`` by ratio, for the patch-outlier
    mask ``outliers`` (N, P) measured at block ``outlier_block``'s output, scored on ``scored_images``
    (``num_images``). ``images(indices)`` yields those probe images normalised, in chunks, on the model's
    device. ``overlap`` is left None: it needs the previous measurement (``top_k_overlap``)."""
    rows = scored_images(outliers, num_images)
    record = {
        "outlier_layer": outlier_block,
        "highest_layer": highest,
        "top_k": top_k,
        "outlier_fraction": float(outliers.float().mean()),
        "images_with_outliers": int(outliers.any(1).sum()),
        "images_scored": 0,
        "neurons": [],
        "overlap": None,
    }
    if not outliers.any():
        record["note"] = f"no outlier patch at block {outlier_block}: no register neurons"
        return record
    mask = outliers[rows]

    def chunks():
        start = 0
        for x in images(rows):
            yield x, mask[start : start + x.shape[0]].to(x.device)
            start += x.shape[0]

    activity = neuron_activity(model, chunks(), highest)
    record["images_scored"] = activity.num_images
    record["neurons"] = top_neurons(activity, top_k, by="ratio")
    return record

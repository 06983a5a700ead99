"""Capture per-layer token statistics of a backbone with forward hooks, without keeping activations.

A probe forward of ViT-L on 64 images would hold ~1.6 GB if every layer's tokens were kept, so each
hook reduces its layer at once: L2 norms of every token before and after the final LayerNorm, the
prefix tokens (CLS + registers) after it, the channel-activation extremes, and, recomputed through
the math path from the block input, the CLS attention row and the attention each token receives.

"Layer l" is the residual stream after l blocks: layer 0 is the embedded input (patch embedding +
positions + registers), layer L the last block's output (``x_prenorm``). Attention of layer l is the
attention inside block l (none at layer 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class LayerCapture:
    prenorm_norms: Tensor  # (B, T) L2 norm of each token in the residual stream
    postnorm_norms: Tensor  # (B, T) ... after the backbone's final LayerNorm
    prefix_postnorm: Tensor  # (B, 1 + R, D) CLS and registers after the final LayerNorm
    max_abs_activation: float  # the largest |x| over patch tokens and channels (massive activations)
    median_abs_activation: float
    cls_attention: Tensor | None = None  # (B, H, T) CLS query -> all tokens, of this layer's block
    received_attention: Tensor | None = None  # (B, H, T) attention each token receives, mean over queries
    register_attention: Tensor | None = None  # (B, R, T) register queries -> all tokens, mean over heads


@dataclass
class Capture:
    """Everything telemetry needs from one probe forward."""

    layers: list[LayerCapture]  # depth + 1 entries, layer 0 = block input
    grid: tuple[int, int]  # patch grid (h, w)
    num_registers: int
    neighbour_cosine: Tensor  # (B, h, w) mean cosine of each patch with its 4-neighbours after patch_embed
    register_params: Tensor | None = None  # (R, D) the learned register tokens
    extras: dict = field(default_factory=dict)

    @property
    def num_prefix(self) -> int:
        return 1 + self.num_registers

    @property
    def depth(self) -> int:
        return len(self.layers) - 1


def neighbour_cosine(patch_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Mean cosine similarity of each patch with its up/down/left/right neighbours inside the grid.

    ``patch_tokens`` is (B, h*w, D) in row-major order; returns (B, h, w)."""
    b, _, d = patch_tokens.shape
    h, w = grid
    x = torch.nn.functional.normalize(patch_tokens.float(), dim=-1).view(b, h, w, d)
    total = torch.zeros(b, h, w, device=x.device)
    count = torch.zeros(1, h, w, device=x.device)
    vertical = (x[:, 1:] * x[:, :-1]).sum(-1)  # (B, h-1, w): row i with row i+1
    horizontal = (x[:, :, 1:] * x[:, :, :-1]).sum(-1)  # (B, h, w-1)
    total[:, 1:] += vertical
    total[:, :-1] += vertical
    total[:, :, 1:] += horizontal
    total[:, :, :-1] += horizontal
    count[:, 1:] += 1
    count[:, :-1] += 1
    count[:, :, 1:] += 1
    count[:, :, :-1] += 1
    return total / count.clamp(min=1)


def _reduce_layer(backbone: nn.Module, x: Tensor, num_prefix: int) -> LayerCapture:
    x = x.float()
    post = backbone.norm(x).float()
    patches = x[:, num_prefix:].abs()
    return LayerCapture(
        prenorm_norms=x.norm(dim=-1).cpu(),
        postnorm_norms=post.norm(dim=-1).cpu(),
        prefix_postnorm=post[:, :num_prefix].cpu(),
        max_abs_activation=float(patches.max()) if patches.numel() else 0.0,
        median_abs_activation=float(patches.median()) if patches.numel() else 0.0,
    )


@torch.no_grad()
def capture(backbone: nn.Module, images: Tensor, attention: bool = True) -> Capture:
    """One forward of ``backbone`` (a ``VisionTransformer``) on ``images`` (B, 3, H, W) with hooks
    on ``patch_embed`` and every block. The caller chooses train/eval mode; use eval for telemetry."""
    p = backbone.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    num_prefix = 1 + backbone.num_register_tokens
    layers: list[LayerCapture | None] = [None] * (len(backbone.blocks) + 1)
    patch_cos: list[Tensor] = []
    handles = []

    def on_patch_embed(_module, _args, out: Tensor) -> None:
        patch_cos.append(neighbour_cosine(out, grid).cpu())

    def before_block(index: int):
        def hook(block: nn.Module, args) -> None:
            x = args[0]
            if index == 0:
                layers[0] = _reduce_layer(backbone, x, num_prefix)
            if attention:
                probs = block.attn.attention_probs(block.norm1(x)).float()  # (B, H, T, T)
                target = layers[index + 1] = layers[index + 1] or {}
                target["cls"] = probs[:, :, 0].cpu()
                target["received"] = probs.mean(dim=2).cpu()
                target["registers"] = probs[:, :, 1:num_prefix].mean(dim=1).cpu()

        return hook

    def after_block(index: int):
        def hook(_block, _args, out: Tensor) -> None:
            pending = layers[index + 1] if isinstance(layers[index + 1], dict) else {}
            layer = _reduce_layer(backbone, out, num_prefix)
            layer.cls_attention = pending.get("cls")
            layer.received_attention = pending.get("received")
            layer.register_attention = pending.get("registers")
            layers[index + 1] = layer

        return hook

    handles.append(backbone.patch_embed.register_forward_hook(on_patch_embed))
    for i, block in enumerate(backbone.blocks):
        handles.append(block.register_forward_pre_hook(before_block(i)))
        handles.append(block.register_forward_hook(after_block(i)))
    try:
        with torch.autocast(images.device.type, enabled=False):
            backbone.forward_features(images.float())
    finally:
        for handle in handles:
            handle.remove()
    if any(not isinstance(layer, LayerCapture) for layer in layers):
        raise RuntimeError("telemetry hooks did not see every block; is the backbone a vitreg VisionTransformer?")
    registers = getattr(backbone, "register_tokens", None)
    return Capture(
        layers=layers,  # type: ignore[arg-type]
        grid=grid,
        num_registers=backbone.num_register_tokens,
        neighbour_cosine=patch_cos[0],
        register_params=registers.detach()[0].float().cpu() if registers is not None else None,
    )


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]


def merge_captures(parts: list[Capture]) -> Capture:
    """One ``Capture`` from captures of consecutive image chunks (same backbone and resolution).

    The median |activation| of the whole batch is approximated by the median of the chunk medians."""
    if len(parts) == 1:
        return parts[0]
    layers = []
    for per_chunk in zip(*(p.layers for p in parts), strict=True):
        layers.append(
            LayerCapture(
                prenorm_norms=torch.cat([c.prenorm_norms for c in per_chunk]),
                postnorm_norms=torch.cat([c.postnorm_norms for c in per_chunk]),
                prefix_postnorm=torch.cat([c.prefix_postnorm for c in per_chunk]),
                max_abs_activation=max(c.max_abs_activation for c in per_chunk),
                median_abs_activation=float(torch.tensor([c.median_abs_activation for c in per_chunk]).median()),
                cls_attention=_cat([c.cls_attention for c in per_chunk]),
                received_attention=_cat([c.received_attention for c in per_chunk]),
                register_attention=_cat([c.register_attention for c in per_chunk]),
            )
        )
    first = parts[0]
    return Capture(
        layers=layers,
        grid=first.grid,
        num_registers=first.num_registers,
        neighbour_cosine=torch.cat([p.neighbour_cosine for p in parts]),
        register_params=first.register_params,
    )

"""Capture per-layer token statistics of a backbone layer by layer, without keeping activations.

A probe forward of ViT-L on 64 images would hold ~1.6 GB if every layer's tokens were kept, so each
layer is reduced as the backbone's ``iter_layers`` yields it: L2 norms of every token before and after the final LayerNorm, the
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

from vitreg.models.layout import TokenLayout


@dataclass
class LayerCapture:
    prenorm_norms: Tensor  # (B, T) L2 norm of each token in the residual stream
    postnorm_norms: Tensor  # (B, T) ... after the backbone's final LayerNorm
    prefix_postnorm: Tensor  # (B, 1 + R, D) CLS and registers after the final LayerNorm
    max_abs_activation: float  # the largest |x| over patch tokens and channels (massive activations)
    median_abs_activation: float
    cls_patch_cosine: Tensor  # (B,) mean cosine of CLS with each patch after the final LayerNorm (locality drift)
    channel_mean_abs: Tensor  # (B, D) mean |x| of each channel over the patch tokens (channel outliers)
    cls_attention: Tensor | None = None  # (B, H, T) CLS query -> all tokens, of this layer's block
    received_attention: Tensor | None = None  # (B, H, T) attention each token receives, mean over queries
    register_attention: Tensor | None = None  # (B, R, T) register queries -> all tokens, mean over heads
    sink_attention: Tensor | None = None  # (B, H, T) mass each query puts on the attention-bias sink (model.attn_bias)


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
    def layout(self) -> TokenLayout:
        return TokenLayout(self.num_registers)

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


def _reduce_layer(backbone: nn.Module, x: Tensor, layout: TokenLayout) -> LayerCapture:
    x = x.float()
    post = backbone.norm(x).float()
    patches = layout.patches(x).abs()
    unit = torch.nn.functional.normalize(post, dim=-1)
    return LayerCapture(
        prenorm_norms=x.norm(dim=-1).cpu(),
        postnorm_norms=post.norm(dim=-1).cpu(),
        prefix_postnorm=layout.prefix(post).cpu(),
        max_abs_activation=float(patches.max()) if patches.numel() else 0.0,
        median_abs_activation=float(patches.median()) if patches.numel() else 0.0,
        cls_patch_cosine=(layout.patches(unit) @ layout.cls(unit).unsqueeze(-1)).squeeze(-1).mean(1).cpu(),
        channel_mean_abs=patches.mean(1).cpu(),
    )


@torch.no_grad()
def capture(backbone: nn.Module, images: Tensor, attention: bool = True) -> Capture:
    """One forward of ``backbone`` (a ``VisionTransformer``) on ``images`` (B, 3, H, W), each layer reduced
    as ``iter_layers`` computes it. The caller chooses train/eval mode; use eval for telemetry."""
    p = backbone.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    layout = backbone.layout
    layers = []
    with torch.autocast(images.device.type, enabled=False):
        x = images.float()
        patch_cos = neighbour_cosine(backbone.embed_patches(x), grid).cpu()
        for layer in backbone.iter_layers(x, attention=attention):
            reduced = _reduce_layer(backbone, layer.tokens, layout)
            if layer.attention is not None:
                probs = layer.attention.float()  # (B, H, T, T)
                reduced.cls_attention = layout.cls(probs, dim=2).cpu()
                reduced.received_attention = probs.mean(dim=2).cpu()
                reduced.register_attention = layout.registers(probs, dim=2).mean(dim=1).cpu()
                if layer.sink_attention is not None:
                    reduced.sink_attention = layer.sink_attention.float().cpu()
            layers.append(reduced)
    registers = getattr(backbone, "register_tokens", None)
    return Capture(
        layers=layers,
        grid=grid,
        num_registers=layout.num_registers,
        neighbour_cosine=patch_cos,
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
                cls_patch_cosine=torch.cat([c.cls_patch_cosine for c in per_chunk]),
                channel_mean_abs=torch.cat([c.channel_mean_abs for c in per_chunk]),
                cls_attention=_cat([c.cls_attention for c in per_chunk]),
                received_attention=_cat([c.received_attention for c in per_chunk]),
                register_attention=_cat([c.register_attention for c in per_chunk]),
                sink_attention=_cat([c.sink_attention for c in per_chunk]),
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

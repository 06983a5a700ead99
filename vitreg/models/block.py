"""The pre-norm transformer block, run on one batch or on several crop groups packed together.

Packed form: the tokens of every group (e.g. 2 global + 8 local crops at two resolutions) are one
``(sum_i B_i * N_i, D)`` tensor, and ``groups`` lists each group's ``(B_i, N_i)``. Norms,
projections and the FFN then run as single large GEMMs; attention runs once per group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitreg.models.attention import Attention
from vitreg.models.layers import LayerScale, make_ffn

Groups = list[tuple[int, int]]


def sample_subset(groups: Groups, drop_rate: float, device: torch.device) -> tuple[Tensor, Tensor, Groups]:
    """DINOv2's batch-subset stochastic depth, per group: keep exactly ``max(int(B(1-p)), 1)`` samples.

    Returns the packed row indices of the kept samples, the per-row residual scale ``B / kept``
    and the kept groups.
    """
    rows, scales, kept_groups, offset = [], [], [], 0
    for b, n in groups:
        keep = max(int(b * (1 - drop_rate)), 1)
        samples = torch.randperm(b, device=device)[:keep]
        rows.append((offset + samples[:, None] * n + torch.arange(n, device=device)).reshape(-1))
        scales.append(torch.full((keep * n,), b / keep, device=device))
        kept_groups.append((keep, n))
        offset += b * n
    return torch.cat(rows), torch.cat(scales), kept_groups


def per_sample_keep_mask(groups: Groups, drop_rate: float, like: Tensor) -> Tensor:
    """Classic DropPath: one Bernoulli(1-p) draw per sample, scaled by 1/(1-p), repeated per token."""
    keep = 1.0 - drop_rate
    masks = [like.new_empty(b).bernoulli_(keep).div_(keep).repeat_interleave(n) for b, n in groups]
    return torch.cat(masks)[:, None]


class Block(nn.Module):
    """``x = x + ls1(attn(norm1(x)))``, ``x = x + ls2(ffn(norm2(x)))`` with DINOv2's names and numerics.

    Stochastic depth, as DINOv2 trains it: on packed groups (the multi-crop path) any rate > 0 uses
    the batch-subset scheme per group; on a single batch, rates > 0.1 use the subset scheme and
    rates in (0, 0.1] classic per-sample DropPath.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_layer: str,
        ffn_hidden_dim: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path: float = 0.0,
        attn_backend: str = "sdpa",
        attn_bias: str = "none",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, backend=attn_backend, attn_bias=attn_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = make_ffn(ffn_layer, dim, ffn_hidden_dim, ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: Tensor, groups: Groups | None = None) -> Tensor:
        """``x`` is a batch (B, N, D), or packed tokens (sum B_i*N_i, D) of the ``groups`` (B_i, N_i).

        Both go through ``__call__`` so module hooks (telemetry, FSDP2, compile) see every call.
        """
        if groups is not None:
            return self._forward_packed(x, groups, nested=True)
        b, n, d = x.shape
        return self._forward_packed(x.reshape(b * n, d), [(b, n)], nested=False).view(b, n, d)

    def _forward_packed(self, tokens: Tensor, groups: Groups, nested: bool) -> Tensor:
        tokens = self._add_residual(tokens, groups, self._attn_residual, nested)
        return self._add_residual(tokens, groups, self._ffn_residual, nested)

    def inspect(self, x: Tensor, attention: bool, qkv: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """What this block's attention sees for input ``x`` (B, N, D), computed beside the forward (which
        runs as configured): the probabilities over the tokens (B, H, N, N) and on the attention-bias sink
        (B, H, N; None without one) through the math path, and the qkv projection (B, N, 3, D) with heads
        concatenated in each of q, k, v. Each is None unless asked for."""
        b, n, d = x.shape
        normed = self.norm1(x.reshape(b * n, d))  # as the forward normalises: on the packed rows
        probs, sink = self.attn.attention_probs(normed.view(b, n, d)) if attention else (None, None)
        projected = self.attn.qkv(normed).view(b, n, 3, d) if qkv else None
        return probs, sink, projected

    def _attn_residual(self, tokens: Tensor, groups: Groups) -> Tensor:
        return self.ls1(self.attn.forward_groups(self.norm1(tokens), groups))

    def _ffn_residual(self, tokens: Tensor, groups: Groups) -> Tensor:
        return self.ls2(self.mlp(self.norm2(tokens)))

    def _add_residual(self, tokens: Tensor, groups: Groups, residual_fn, nested: bool) -> Tensor:
        rate = self.drop_path if self.training else 0.0
        if rate == 0.0:
            return tokens + residual_fn(tokens, groups)
        if nested or rate > 0.1:
            rows, scale, kept = sample_subset(groups, rate, tokens.device)
            residual = residual_fn(tokens[rows], kept).to(tokens.dtype) * scale[:, None].to(tokens.dtype)
            return tokens.index_add(0, rows, residual)
        return tokens + residual_fn(tokens, groups) * per_sample_keep_mask(groups, rate, tokens)

"""Small building blocks of the DINOv2 backbone, with DINOv2's parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FFN_KINDS: tuple[str, ...] = ("mlp", "swiglu")


def swiglu_hidden_dim(hidden: int) -> int:
    """DINOv2's SwiGLUFFNFused rule: 2/3 of the MLP hidden size, rounded up to a multiple of 8."""
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def ffn_hidden_dim(embed_dim: int, mlp_ratio: float, ffn_layer: str) -> int:
    """The hidden width DINOv2 builds for ``ffn_layer`` at ``mlp_ratio``."""
    hidden = int(embed_dim * mlp_ratio)
    return swiglu_hidden_dim(hidden) if ffn_layer == "swiglu" else hidden


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: Conv2d(kernel = stride = patch), flattened to (B, N, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    @property
    def output_proj(self) -> nn.Linear:
        """The projection whose input is the hidden activation (after the nonlinearity): its neurons."""
        return self.fc2


class SwiGLUFFN(nn.Module):
    """w12 (fused gate and value) -> silu(x1) * x2 -> w3, as DINOv2's SwiGLUFFN."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)

    @property
    def output_proj(self) -> nn.Linear:
        """The projection whose input is the hidden activation (silu(x1) * x2): its neurons."""
        return self.w3


def make_ffn(kind: str, dim: int, hidden: int, bias: bool = True) -> nn.Module:
    if kind == "mlp":
        return Mlp(dim, hidden, bias)
    if kind == "swiglu":
        return SwiGLUFFN(dim, hidden, bias)
    raise ValueError(f"ffn_layer must be one of {list(FFN_KINDS)}, got {kind!r}")


class LayerScale(nn.Module):
    """Per-channel residual scaling ``x * gamma`` (CaiT), gamma initialised to a constant."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

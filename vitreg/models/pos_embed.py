"""Resampling DINOv2's learned positional-embedding table to another patch grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def interpolate_pos_embed(pos_embed: Tensor, grid_hw: tuple[int, int], *, antialias: bool, offset: float) -> Tensor:
    """Resample a ``(1, 1 + M*M, D)`` table (CLS entry + square M×M grid) to a ``(h, w)`` grid.

    Follows DINOv2 exactly: bicubic in float32, ``align_corners=False``; with ``offset > 0`` the
    kernel is driven by ``scale_factor = ((h + offset) / M, (w + offset) / M)`` (the DINO #8 kludge,
    whose coordinate mapping differs slightly from the size path); with ``offset == 0`` by
    ``size=(h, w)``. Returns a float32 ``(1, 1 + h*w, D)`` tensor.
    """
    num_grid = pos_embed.shape[1] - 1
    side = math.isqrt(num_grid)
    if side * side != num_grid:
        raise ValueError(f"pos_embed must hold a square grid plus CLS; got {num_grid} grid entries")
    h, w = grid_hw
    table = pos_embed.float()
    cls_pos, grid = table[:, :1], table[:, 1:]
    dim = table.shape[-1]
    resize = {"scale_factor": ((h + offset) / side, (w + offset) / side)} if offset else {"size": (h, w)}
    grid = F.interpolate(
        grid.reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **resize
    )
    if tuple(grid.shape[-2:]) != (h, w):
        raise ValueError(
            f"interpolate_offset={offset} maps a {side}x{side} grid to {tuple(grid.shape[-2:])}, not {(h, w)}; "
            "use a smaller offset (DINOv2 uses 0.1) or 0 for the exact-size path"
        )
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat((cls_pos, grid), dim=1)

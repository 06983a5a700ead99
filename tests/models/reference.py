"""Independent reference material for the backbone tests, written from the DINOv2 spec
(``dinov2/models/vision_transformer.py::DinoVisionTransformer``), not from vitreg's code:

- ``official_state_dict``: random tensors under the official hub key names and shapes;
- ``reference_forward``: a naive forward over such a state dict (explicit softmax attention,
  per-image loops, registers spliced in after the positional embedding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def official_state_dict(
    dim: int = 64,
    depth: int = 2,
    patch: int = 14,
    grid: int = 4,
    registers: int = 0,
    ffn: str = "mlp",
    hidden: int | None = None,
    layerscale: bool = True,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A DINOv2 hub-layout (``block_chunks=0``) backbone state dict with random values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.05) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    hidden = hidden or 4 * dim
    sd = {"cls_token": rnd(1, 1, dim, scale=1.0), "pos_embed": rnd(1, 1 + grid * grid, dim, scale=0.5)}
    if registers:
        sd["register_tokens"] = rnd(1, registers, dim, scale=1.0)
    sd["mask_token"] = rnd(1, dim, scale=1.0)
    sd["patch_embed.proj.weight"] = rnd(dim, 3, patch, patch)
    sd["patch_embed.proj.bias"] = rnd(dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = 1 + rnd(dim, scale=0.1)
        sd[b + "norm1.bias"] = rnd(dim)
        sd[b + "attn.qkv.weight"] = rnd(3 * dim, dim)
        sd[b + "attn.qkv.bias"] = rnd(3 * dim)
        sd[b + "attn.proj.weight"] = rnd(dim, dim)
        sd[b + "attn.proj.bias"] = rnd(dim)
        if layerscale:
            sd[b + "ls1.gamma"] = rnd(dim, scale=0.5)
        sd[b + "norm2.weight"] = 1 + rnd(dim, scale=0.1)
        sd[b + "norm2.bias"] = rnd(dim)
        if ffn == "mlp":
            sd[b + "mlp.fc1.weight"] = rnd(hidden, dim)
            sd[b + "mlp.fc1.bias"] = rnd(hidden)
            sd[b + "mlp.fc2.weight"] = rnd(dim, hidden)
            sd[b + "mlp.fc2.bias"] = rnd(dim)
        else:
            sd[b + "mlp.w12.weight"] = rnd(2 * hidden, dim)
            sd[b + "mlp.w12.bias"] = rnd(2 * hidden)
            sd[b + "mlp.w3.weight"] = rnd(dim, hidden)
            sd[b + "mlp.w3.bias"] = rnd(dim)
        if layerscale:
            sd[b + "ls2.gamma"] = rnd(dim, scale=0.5)
    sd["norm.weight"] = 1 + rnd(dim, scale=0.1)
    sd["norm.bias"] = rnd(dim)
    return sd


def _layer_norm(x: Tensor, sd: dict, name: str) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]


def _linear(x: Tensor, sd: dict, name: str) -> Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def reference_forward(
    sd: dict[str, Tensor], images: Tensor, heads: int, pos_embed: Tensor, masks: Tensor | None = None
) -> Tensor:
    """Pre-norm output ``x_prenorm`` (B, 1+R+P, D) of a DINOv2 backbone, computed naively in float64.

    ``pos_embed`` is the (1, 1+P, D) table for this image size (interpolation is tested separately).
    """
    sd = {k: v.double() for k, v in sd.items()}
    images, pos_embed = images.double(), pos_embed.double()
    w = sd["patch_embed.proj.weight"]
    dim, p = w.shape[0], w.shape[-1]
    b, _, h, wd = images.shape
    # patchify row-major, each patch flattened as (C, p, p) to match the conv weight
    patches = images.unfold(2, p, p).unfold(3, p, p)  # B C h w p p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (wd // p), -1)
    x = patches @ w.reshape(dim, -1).T + sd["patch_embed.proj.bias"]
    if masks is not None:
        x = torch.where(masks[..., None], sd["mask_token"][None], x)
    x = torch.cat([sd["cls_token"].expand(b, 1, dim), x], dim=1) + pos_embed
    if "register_tokens" in sd:
        regs = sd["register_tokens"].expand(b, -1, -1)
        x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hd = dim // heads
    for i in range(depth):
        pre = f"blocks.{i}."
        y = _layer_norm(x, sd, pre + "norm1")
        qkv = _linear(y, sd, pre + "attn.qkv").reshape(b, -1, 3, heads, hd)
        out = torch.empty_like(y)
        for n in range(b):  # per image, per head: softmax(q k^T / sqrt(d)) v
            for hh in range(heads):
                q, k, v = qkv[n, :, 0, hh], qkv[n, :, 1, hh], qkv[n, :, 2, hh]
                att = torch.softmax(q @ k.T / math.sqrt(hd), dim=-1)
                out[n, :, hh * hd : (hh + 1) * hd] = att @ v
        out = _linear(out, sd, pre + "attn.proj")
        x = x + out * sd.get(pre + "ls1.gamma", torch.ones(()))
        y = _layer_norm(x, sd, pre + "norm2")
        if pre + "mlp.fc1.weight" in sd:
            y = _linear(F.gelu(_linear(y, sd, pre + "mlp.fc1")), sd, pre + "mlp.fc2")
        else:
            a, gate = _linear(y, sd, pre + "mlp.w12").chunk(2, dim=-1)
            y = _linear(F.silu(a) * gate, sd, pre + "mlp.w3")
        x = x + y * sd.get(pre + "ls2.gamma", torch.ones(()))
    return x

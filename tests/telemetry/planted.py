"""ViTs with planted high-norm artifacts: weights edited so chosen tokens get huge norms from a chosen
block on, with nothing else changed in kind. Used to check that telemetry finds exactly them.

How: channel 0 of the residual stream becomes a marker. It is zero for every token (patch embedding,
CLS, positions) except the chosen patch positions (through their positional embedding) or the chosen
registers, where it is ``m``; no block writes to channel 0, so the marker survives unchanged. In block
``block`` one MLP neuron reads channel 0 after ``norm2`` and writes a large vector into the other
channels, so the marked tokens' norms jump by ~``boost`` times the typical norm from layer
``block + 1`` on (layer l = after l blocks).
"""

from __future__ import annotations

import torch

from vitreg.models.vision_transformer import VisionTransformer, build_vit

GRID = 8  # 112 px / 14
IMG = 112


def probe_images(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, IMG, IMG), generator=g, dtype=torch.uint8)


@torch.no_grad()
def planted_vit(
    num_registers: int = 4,
    patches: list[int] | tuple[int, ...] = (),
    registers: list[int] | tuple[int, ...] = (),
    block: int = 5,
    boost: float = 20.0,
    seed: int = 0,
    identical_registers: bool = False,
) -> VisionTransformer:
    torch.manual_seed(seed)
    model = build_vit("vitt", num_register_tokens=num_registers, patch_size=14, img_size=IMG, layerscale_init=None)
    model.eval()
    d = model.embed_dim
    if identical_registers and num_registers:
        model.register_tokens.copy_(model.register_tokens[:, :1].expand_as(model.register_tokens))
    # the typical per-channel scale of the embedded tokens sets a marker that barely changes norms
    x = torch.randn(4, 3, IMG, IMG)
    scale = float(model.prepare_tokens_with_masks(x)[:, 1:].std())
    marker = 4.0 * scale
    model.patch_embed.proj.weight[0] = 0
    model.patch_embed.proj.bias[0] = 0
    model.cls_token[..., 0] = 0
    model.pos_embed[..., 0] = 0
    for p in patches:
        model.pos_embed[0, 1 + p, 0] = marker
    if num_registers:
        model.register_tokens[..., 0] = 0
        for r in registers:
            model.register_tokens[0, r, 0] = marker
    for blk in model.blocks:  # nothing writes to the marker channel
        blk.attn.proj.weight[0] = 0
        blk.attn.proj.bias[0] = 0
        blk.mlp.fc2.weight[0] = 0
        blk.mlp.fc2.bias[0] = 0
    # calibrate the planted neuron on the stream entering the planted block
    tokens = model.prepare_tokens_with_masks(x)
    for blk in model.blocks[:block]:
        tokens = blk(tokens)
    typical = float(tokens.norm(dim=-1).median())
    z0 = model.blocks[block].norm2(tokens)[..., 0]  # (B, T)
    marked = torch.zeros(z0.shape[1], dtype=torch.bool)
    marked[[1 + num_registers + p for p in patches] + [1 + r for r in registers]] = True
    lo = float(z0[:, ~marked].max())
    hi = float(z0[:, marked].min()) if marked.any() else lo + 1.0
    assert hi > lo + 0.5, f"marker too weak to separate marked tokens ({hi:.2f} vs {lo:.2f})"
    weight = 10.0 / (hi - lo)
    mlp = model.blocks[block].mlp
    mlp.fc1.weight[0] = 0
    mlp.fc1.weight[0, 0] = weight
    mlp.fc1.bias[0] = -weight * (lo + hi) / 2  # unmarked tokens: pre-activation <= -5, GELU ~ 0
    mlp.fc2.weight[1:, 0] = boost * typical / (5.0 * (d - 1) ** 0.5)  # activation >= 5 -> jump >= boost x
    mlp.fc2.weight[0, 0] = 0
    return model

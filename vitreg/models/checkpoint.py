"""Interop with official DINOv2 backbone checkpoints.

Layouts understood (all fp32 or half tensors, loaded with ``weights_only=True``):
- ``hub``: the released ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` files, ``block_chunks=0``:
  keys ``cls_token``, ``pos_embed``, ``blocks.<i>.…``, ``norm.…``.
- ``chunked``: training-time models built with ``block_chunks>0``: ``blocks.<chunk>.<i>.…``.
- ``teacher``: the eval dumps ``{"teacher": {"backbone.…", "dino_head.…", …}}``.
- ``train``: the trainer's ``{"model": {"student.backbone.…", "teacher.backbone.…", …}}`` files.

Our parameter names equal the hub layout, so conversion is only key renaming.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from os import PathLike
from typing import Literal

import torch
from torch import Tensor

from vitreg.models.config import ViTConfig, size_name
from vitreg.models.layers import ffn_hidden_dim
from vitreg.models.vision_transformer import VisionTransformer
from vitreg.utils.io import atomic_torch_save

Layout = Literal["hub", "chunked", "teacher"]
LAYOUTS: tuple[str, ...] = ("hub", "chunked", "teacher")
DINOV2_HEAD_DIM = 64  # every official architecture uses 64-dim heads
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight")


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model: lists missing, unexpected and mis-shaped keys."""


def _read(source: str | PathLike | Mapping) -> Mapping:
    return load_checkpoint_file(source) if isinstance(source, (str, PathLike)) else source


def load_checkpoint_file(path: str | PathLike) -> Mapping:
    """``torch.load`` on CPU with ``weights_only=True``: tensors and plain containers, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle refusing a class, a truncated file, …
        raise ValueError(
            f"could not read {path} as a weights-only checkpoint ({type(err).__name__}: {err}). "
            "vitreg never unpickles code; re-save the file as a plain state dict of tensors."
        ) from err


def _unwrap_key(key: str) -> str:
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    return key[len("module.") :] if key.startswith("module.") else key


def extract_backbone_state_dict(
    checkpoint: Mapping, which: Literal["teacher", "student"] = "teacher"
) -> dict[str, Tensor]:
    """The backbone's tensors in hub layout, from any of the layouts in the module docstring.

    ``which`` picks teacher or student in trainer files that hold both. Wrapper prefixes left by
    DDP, FSDP, activation checkpointing or ``torch.compile`` are removed; chunked block keys
    ``blocks.<chunk>.<i>.`` become ``blocks.<i>.``.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}")
    state, prefixes = checkpoint, ("backbone.", f"{which}.backbone.", f"objective.{which}.backbone.")
    if isinstance(checkpoint.get("teacher"), Mapping):
        state = checkpoint["teacher"]
    elif isinstance(checkpoint.get("model"), Mapping):
        state = checkpoint["model"]
    elif isinstance(checkpoint.get("state_dict"), Mapping):
        state = checkpoint["state_dict"]
    cleaned = {_unwrap_key(k): v for k, v in state.items() if isinstance(v, Tensor)}
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in cleaned):
            cleaned = {k[len(prefix) :]: v for k, v in cleaned.items() if k.startswith(prefix)}
            break
    cleaned = {_CHUNKED_BLOCK.sub(r"blocks.\2.", k): v for k, v in cleaned.items()}
    missing = [k for k in _REQUIRED if k not in cleaned]
    if missing:
        sample = ", ".join(sorted(cleaned)[:8]) or "(no tensors)"
        raise ValueError(
            f"not a DINOv2 backbone checkpoint: no {missing} found (after removing "
            f"'backbone.'/'{which}.backbone.' prefixes). First keys: {sample}"
        )
    return cleaned


def _num_heads(sd: Mapping[str, Tensor], dim: int) -> int | None:
    """An attention-bias sink stores one key per head (H, d); otherwise DINOv2's 64-dim heads are assumed."""
    if "blocks.0.attn.sink_key" in sd:
        return sd["blocks.0.attn.sink_key"].shape[0]
    return dim // DINOV2_HEAD_DIM if dim % DINOV2_HEAD_DIM == 0 else None


def infer_vit_config(state_dict: Mapping[str, Tensor], **overrides) -> ViTConfig:
    """Size, patch size, registers, FFN kind, biases, LayerScale and pos-embed grid from the tensors.

    Heads are not stored in a state dict: they default to ``embed_dim / 64`` (DINOv2's head dim);
    pass ``num_heads=`` for other models. Explicit ``overrides`` win over inferred values.
    """
    sd = state_dict
    dim = sd["cls_token"].shape[-1]
    proj = sd["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise ValueError(f"patch_embed.proj.weight should be (D, C, p, p), got {tuple(proj.shape)}")
    patch = proj.shape[-1]
    grid_entries = sd["pos_embed"].shape[1] - 1
    side = math.isqrt(grid_entries)
    if side * side != grid_entries:
        raise ValueError(f"pos_embed holds {grid_entries} grid entries, not a square grid plus CLS")
    block_ids = {int(m.group(1)) for k in sd if (m := _BLOCK_INDEX.match(k))}
    if not block_ids:
        raise ValueError("no 'blocks.<i>.' keys found: not a ViT backbone state dict")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2 if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    ffn = "swiglu" if swiglu else "mlp"
    inferred = {
        "embed_dim": dim,
        "depth": max(block_ids) + 1,
        "num_heads": _num_heads(sd, dim),
        "patch_size": patch,
        "img_size": side * patch,
        "in_chans": proj.shape[1],
        "ffn_layer": ffn,
        "ffn_hidden_dim": None if hidden == ffn_hidden_dim(dim, 4.0, ffn) else hidden,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "ffn_bias": ("blocks.0.mlp.w12.bias" if swiglu else "blocks.0.mlp.fc1.bias") in sd,
        "num_register_tokens": sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        "register_pos_embed": "register_pos_embed" in sd,
        # The value is overwritten by the checkpoint; only presence matters (hub models use 1.0).
        "layerscale_init": 1.0 if "blocks.0.ls1.gamma" in sd else None,
        "attn_bias": "kv" if "blocks.0.attn.sink_key" in sd else "none",
    }
    merged = {**inferred, **overrides}
    if merged["num_heads"] is None:
        raise ValueError(f"embed_dim {dim} is not a multiple of {DINOV2_HEAD_DIM}: pass num_heads= explicitly")
    return ViTConfig(**merged)


def describe(cfg: ViTConfig) -> str:
    name = size_name(cfg) or f"ViT(D={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads})"
    return (
        f"{name}/{cfg.patch_size} with {cfg.num_register_tokens} registers, {cfg.ffn_layer} FFN "
        f"(hidden {cfg.hidden_dim}), pos-embed grid {cfg.grid_size}x{cfg.grid_size}"
    )


def check_state_dict_fits(model: VisionTransformer, state_dict: Mapping[str, Tensor]) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()

    def top_level_first(key: str) -> tuple[bool, str]:  # cls/pos/patch keys tell the story fastest
        return key.startswith("blocks."), key

    missing = sorted(set(expected) - set(state_dict), key=top_level_first)
    unexpected = sorted(set(state_dict) - set(expected), key=top_level_first)
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict), key=top_level_first)
        if state_dict[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint does not fit the model ({describe(model.cfg)})."]
    with contextlib.suppress(KeyError, ValueError):  # a description is a bonus, not required
        lines.append(f"The checkpoint looks like: {describe(infer_vit_config(state_dict))}.")
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", shapes),
    ):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    … and {len(items) - 20} more" if len(items) > 20 else "")
            lines.append(f"  {title} ({len(items)}):\n    {shown}")
    raise CheckpointMismatchError("\n".join(lines))


def load_backbone_weights(
    model: VisionTransformer,
    source: str | PathLike | Mapping,
    which: Literal["teacher", "student"] = "teacher",
) -> VisionTransformer:
    """Load an official checkpoint (file or mapping, any layout) into ``model`` with strict checks."""
    checkpoint = _read(source)
    state_dict = extract_backbone_state_dict(checkpoint, which)
    check_state_dict_fits(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model


def export_dinov2_state_dict(model: VisionTransformer, layout: Layout = "hub", block_chunks: int = 4) -> dict:
    """The backbone in an official layout (tensors are detached CPU copies).

    ``hub``: what the released ``*_pretrain.pth`` files hold. ``chunked``: keys
    ``blocks.<i // (depth // block_chunks)>.<i>.`` as DINOv2 trains with ``block_chunks``.
    ``teacher``: ``{"teacher": {"backbone.<key>": …}}`` like the eval dumps (backbone only).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if model.cfg.register_pos_embed:
        raise ValueError(
            "this model has register positional embeddings (model.register_pos_embed=true), "
            "which official DINOv2 has no key for; it cannot be exported to a DINOv2 layout"
        )
    if model.cfg.attn_bias != "none":
        raise ValueError(
            f"this model has attention-bias sinks (model.attn_bias={model.cfg.attn_bias}), learned keys and values "
            "official DINOv2's attention has no place for; it cannot be exported to a DINOv2 layout. "
            "Load it from its vitreg checkpoint with vitreg.models.load_backbone instead"
        )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if layout == "chunked":
        depth = model.cfg.depth
        if not 0 < block_chunks <= depth:
            raise ValueError(f"block_chunks must be in 1..{depth} for a {depth}-block model, got {block_chunks}")
        chunk = depth // block_chunks

        def rechunk(key: str) -> str:
            return _BLOCK_INDEX.sub(lambda m: f"blocks.{int(m.group(1)) // chunk}.{m.group(1)}.", key)

        state = {rechunk(k): v for k, v in state.items()}
    if layout == "teacher":
        state = {"teacher": {f"backbone.{k}": v for k, v in state.items()}}
    return state


def save_dinov2_checkpoint(
    model: VisionTransformer, path: str | PathLike, layout: Layout = "hub", block_chunks: int = 4
) -> None:
    """Write the backbone in an official layout, atomically (a crash never leaves a partial file)."""
    atomic_torch_save(export_dinov2_state_dict(model, layout, block_chunks), path)

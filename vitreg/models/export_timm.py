"""timm interop: a vitreg backbone as a state dict for ``timm.create_model("vit_*_dinov2", ...)``, and back.

timm is never imported (it needs torchvision, which must not be installed next to vitreg). The layout is
written from timm's ``VisionTransformer`` (``timm/models/vision_transformer.py``):
- ``cls_token``, ``reg_token`` (registers), ``pos_embed``, ``patch_embed.proj.*``, ``norm.*``;
- ``blocks.<i>.norm1``, ``attn.qkv`` (fused, same row order as DINOv2), ``attn.proj``, ``ls1.gamma``,
  ``norm2``, ``mlp.fc1``/``mlp.fc2``, ``ls2.gamma``; no ``mask_token`` (timm has none, and a file holding
  one is taken by timm's loader for a DINOv2 file and converted again).
- register models use ``no_embed_class=True`` (as timm's ``vit_*_reg4_dinov2``): ``pos_embed`` covers the
  patches only and CLS carries its position folded in (``cls_token + pos_embed[:, 0]``, the same sum
  DINOv2 computes in its forward). Models without registers keep the CLS entry (timm's ``vit_*_dinov2``).
- SwiGLU is timm's ``SwiGLUPacked`` (``GluMlp``, gate first): ``w12`` -> ``fc1``, ``w3`` -> ``fc2``, built with
  ``mlp_ratio = 2 * hidden / embed_dim`` and ``act_layer=nn.SiLU``.
- no LayerScale: ``init_values=0`` builds ``nn.Identity`` (``None`` would be dropped by ``create_model``,
  which prunes None keyword arguments, and the model's default 1e-5 would return).
- timm resamples positions bicubic with antialias at the exact size (``resample_abs_pos_embed``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from os import PathLike

import torch
from torch import Tensor

from vitreg.models.config import ViTConfig, size_name
from vitreg.models.export_hf import ExportError
from vitreg.models.vision_transformer import VisionTransformer

TIMM_INTERPOLATION: tuple[bool, float] = (True, 0.0)  # (antialias, offset): bicubic at the exact size
_TIMM_SIZES = {"vits": "small", "vitb": "base", "vitl": "large", "vitg": "giant"}


class Code(str):
    """A keyword value that is Python code (a class), printed as is rather than as a quoted string."""

    def __repr__(self) -> str:
        return str(self)


def timm_model_name(cfg: ViTConfig) -> str:
    """A registered timm DINOv2 name for ``cfg``; every architectural argument is passed explicitly anyway."""
    size = _TIMM_SIZES.get(size_name(cfg) or "", "small")
    if cfg.ffn_layer == "swiglu":
        size = "giant"  # the only one whose defaults are SwiGLUPacked + SiLU
    elif size == "giant":
        size = "large"  # giant's defaults would bring SwiGLU back
    registers = "_reg4" if cfg.num_register_tokens else ""
    return f"vit_{size}_patch14{registers}_dinov2"


def _glu_mlp_ratio(embed_dim: int, fc1_width: int) -> float:
    """A float ``r`` with ``int(embed_dim * r) == fc1_width`` (timm's Block sizes fc1 that way)."""
    ratio = fc1_width / embed_dim
    while int(embed_dim * ratio) < fc1_width:  # float rounding may land one below
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def timm_kwargs(cfg: ViTConfig) -> dict[str, object]:
    """``timm.create_model`` keyword arguments that rebuild ``cfg`` (classes as ``Code``)."""
    if cfg.register_pos_embed:
        raise ExportError("register positional embeddings (model.register_pos_embed=true) have no timm equivalent")
    if cfg.attn_bias != "none":
        raise ExportError(f"attention-bias sinks (model.attn_bias={cfg.attn_bias}) have no timm equivalent")
    swiglu = cfg.ffn_layer == "swiglu"
    fc1_width = 2 * cfg.hidden_dim if swiglu else cfg.hidden_dim
    kwargs: dict[str, object] = {
        "num_classes": 0,
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": _glu_mlp_ratio(cfg.embed_dim, fc1_width),
        "init_values": 1e-5 if cfg.layerscale_init else 0,  # the value is overwritten by the file
        "reg_tokens": cfg.num_register_tokens,
        "no_embed_class": cfg.num_register_tokens > 0,
        "qkv_bias": cfg.qkv_bias,
        "dynamic_img_size": True,
    }
    if cfg.in_chans != 3:
        kwargs["in_chans"] = cfg.in_chans
    if swiglu:
        kwargs["mlp_layer"] = Code("timm.layers.SwiGLUPacked")  # Block passes act_layer on, so SiLU too
        kwargs["act_layer"] = Code("torch.nn.SiLU")
    return kwargs


def timm_create_line(cfg: ViTConfig, path: str | PathLike) -> str:
    """The exact Python that loads the exported file with timm (run after ``import timm, torch``)."""
    args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(cfg).items())
    return (
        f"model = timm.create_model({timm_model_name(cfg)!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(path)!r}), {args})"
    )


def timm_state_dict(model: VisionTransformer) -> dict[str, Tensor]:
    """The backbone's tensors under timm's keys (contiguous CPU tensors), ready for a safetensors file."""
    cfg = model.cfg
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.pop("mask_token")
    if cfg.num_register_tokens:
        pos = state.pop("pos_embed")
        state["cls_token"] = state["cls_token"] + pos[:, :1]  # no_embed_class: CLS carries its position
        state["pos_embed"] = pos[:, 1:].clone()
        state["reg_token"] = state.pop("register_tokens")
    dim, hidden = cfg.embed_dim, cfg.hidden_dim
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    zeros = {  # biases timm always has (qkv follows qkv_bias): zeros add nothing
        "attn.proj.bias": dim,
        "mlp.fc1.bias": 2 * hidden if cfg.ffn_layer == "swiglu" else hidden,
        "mlp.fc2.bias": dim,
    }
    for i in range(cfg.depth):
        for name, width in zeros.items():
            out.setdefault(f"blocks.{i}.{name}", torch.zeros(width, dtype=out["norm.weight"].dtype))
    return {k: v.contiguous() for k, v in out.items()}


def looks_like_timm_state(state: Mapping) -> bool:
    """timm ViT keys: ``cls_token`` + ``blocks.0.mlp.fc1``/``attn.qkv`` and no DINOv2 ``mask_token``."""
    return (
        "reg_token" in state
        or ("cls_token" in state and "mask_token" not in state and "blocks.0.attn.qkv.weight" in state)
        or "fc_norm.weight" in state
        or "head.weight" in state
    )


def hub_state_dict_from_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A timm DINOv2-style ViT state dict -> vitreg/DINOv2 hub keys.

    ``no_embed_class`` files (``pos_embed`` without a CLS entry, CLS with its position folded in) get a zero
    CLS position, which gives the same sum. SwiGLUPacked's ``fc1`` (twice fc2's input width) becomes ``w12``.
    A missing ``mask_token`` (timm has none) becomes zeros: it is only used for masked training inputs."""
    unsupported = sorted(
        k
        for k in state
        if k.startswith(("head.", "fc_norm.", "attn_pool.", "norm_pre."))
        or ".q_norm." in k
        or ".k_norm." in k
        or ".mlp.norm." in k
    )
    if unsupported:
        raise ValueError(
            f"this timm model has parts a DINOv2 backbone has not: {', '.join(unsupported[:6])}. Export the "
            "backbone without them (timm.create_model(..., num_classes=0) and a 'token' pool), or load it in timm"
        )
    out = {k: v for k, v in state.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    cls, pos = state["cls_token"], state["pos_embed"]
    dim = cls.shape[-1]
    grid = pos.shape[1]
    registers = state.get("reg_token")
    prefix = 1 + (registers.shape[1] if registers is not None else 0)
    if math.isqrt(grid) ** 2 == grid:
        pos = torch.cat((torch.zeros_like(cls), pos), dim=1)  # no_embed_class: CLS position folded into cls_token
    elif math.isqrt(grid - 1) ** 2 != grid - 1:
        raise ValueError(
            f"pos_embed holds {grid} entries: neither a square grid (no_embed_class) nor CLS + a square grid"
            + (f" (with {prefix} prefix positions, which DINOv2 has no equivalent for)" if prefix > 1 else "")
        )
    out["cls_token"], out["pos_embed"] = cls, pos
    if registers is not None:
        out["register_tokens"] = registers
    out.setdefault("mask_token", torch.zeros(1, dim, dtype=cls.dtype))
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        fc1, fc2 = state.get(f"blocks.{i}.mlp.fc1.weight"), state.get(f"blocks.{i}.mlp.fc2.weight")
        if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:  # SwiGLUPacked
            for kind in ("weight", "bias"):
                for old, new in (("fc1", "w12"), ("fc2", "w3")):
                    if f"blocks.{i}.mlp.{old}.{kind}" in out:
                        out[f"blocks.{i}.mlp.{new}.{kind}"] = out.pop(f"blocks.{i}.mlp.{old}.{kind}")
    return out

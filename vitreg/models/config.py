"""Backbone configuration: one dataclass, named sizes, and validation with actionable messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from vitreg.models.attention import ATTN_BACKENDS, ATTN_BIASES
from vitreg.models.layers import FFN_KINDS, ffn_hidden_dim

# Sizes by name. vitt is ours (CPU tests and demos); the rest are DINOv2's vit_small/base/large/giant2.
VIT_SIZES: dict[str, dict] = {
    "vitt": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vits": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vitb": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vitl": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vitg": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu"},
}


@dataclass
class ViTConfig:
    """Everything that defines a backbone. Defaults are DINOv2's training values.

    ``interpolate_antialias`` / ``interpolate_offset`` left as None follow DINOv2's convention:
    register models (``num_register_tokens > 0``) use antialias on and offset 0 (exact-size path),
    models without registers antialias off and offset 0.1. Pin them explicitly when sweeping the
    register count so every run interpolates the same way.
    """

    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    patch_size: int = 14
    img_size: int = 224  # side of the square grid the positional table is stored at
    in_chans: int = 3
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"  # "mlp" | "swiglu" (DINOv2's hidden-size rule for swiglu)
    ffn_hidden_dim: int | None = None  # overrides mlp_ratio (e.g. when inferred from a checkpoint)
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    register_pos_embed: bool = False  # ablation only: learned positions for registers (not DINOv2)
    register_init_std: float = 1e-6  # DINOv2's N(0, 1e-6); DINOv3 uses 0.02 (breaks register symmetry sooner)
    layerscale_init: float | None = 1e-5  # None: no LayerScale
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True  # DINOv2 training configs: same rate in every block
    interpolate_antialias: bool | None = None
    interpolate_offset: float | None = None
    attn_backend: str = "sdpa"  # "auto" | "sdpa" | "xformers" | "math"
    attn_bias: str = "none"  # "kv": a learned key/value sink per layer and head (an alternative to registers)

    def __post_init__(self) -> None:
        validate_vit_config(self)

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return ffn_hidden_dim(self.embed_dim, self.mlp_ratio, self.ffn_layer)

    @property
    def antialias(self) -> bool:
        if self.interpolate_antialias is not None:
            return self.interpolate_antialias
        return self.num_register_tokens > 0

    @property
    def offset(self) -> float:
        if self.interpolate_offset is not None:
            return self.interpolate_offset
        return 0.0 if self.num_register_tokens > 0 else 0.1

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def drop_path_rates(self) -> list[float]:
        if self.drop_path_uniform or self.depth == 1:
            return [self.drop_path_rate] * self.depth
        # np.linspace(0, rate, depth), written out so the model package needs no numpy
        return [self.drop_path_rate * i / (self.depth - 1) for i in range(self.depth)]


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"model.{key}: {message}")


def validate_vit_config(cfg: ViTConfig) -> None:
    """Raise a ValueError naming the offending key, what it got and what would work."""
    _require(
        cfg.register_init_std > 0,
        "register_init_std",
        f"must be > 0 (identical registers never separate), got {cfg.register_init_std}",
    )
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans"):
        value = getattr(cfg, key)
        _require(isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}")
    _require(
        isinstance(cfg.num_register_tokens, int) and cfg.num_register_tokens >= 0,
        "num_register_tokens",
        f"must be an integer >= 0 (0 = no registers), got {cfg.num_register_tokens!r}",
    )
    _require(
        cfg.embed_dim % cfg.num_heads == 0,
        "num_heads",
        f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}",
    )
    _require(
        cfg.img_size % cfg.patch_size == 0,
        "img_size",
        f"{cfg.img_size} is not a multiple of patch_size {cfg.patch_size}; "
        f"try {cfg.grid_size * cfg.patch_size or cfg.patch_size}",
    )
    _require(cfg.ffn_layer in FFN_KINDS, "ffn_layer", f"must be one of {list(FFN_KINDS)}, got {cfg.ffn_layer!r}")
    _require(
        cfg.attn_backend in ATTN_BACKENDS,
        "attn_backend",
        f"must be one of {list(ATTN_BACKENDS)}, got {cfg.attn_backend!r}",
    )
    _require(
        cfg.attn_bias in ATTN_BIASES,
        "attn_bias",
        f"must be one of {list(ATTN_BIASES)} (kv: a learned key/value attention sink), got {cfg.attn_bias!r}",
    )
    _require(0.0 <= cfg.drop_path_rate < 1.0, "drop_path_rate", f"must be in [0, 1), got {cfg.drop_path_rate}")
    _require(cfg.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {cfg.mlp_ratio}")
    _require(
        cfg.ffn_hidden_dim is None or cfg.ffn_hidden_dim > 0,
        "ffn_hidden_dim",
        f"must be a positive integer or None, got {cfg.ffn_hidden_dim!r}",
    )
    _require(
        cfg.interpolate_offset is None or cfg.interpolate_offset >= 0,
        "interpolate_offset",
        f"must be >= 0 (0 = exact-size path, DINOv2 uses 0.1), got {cfg.interpolate_offset}",
    )
    _require(
        cfg.layerscale_init is None or cfg.layerscale_init > 0,
        "layerscale_init",
        f"must be > 0 or None (no LayerScale), got {cfg.layerscale_init}",
    )


def vit_config(name: str, **overrides) -> ViTConfig:
    """The config of a named size (``vitt``, ``vits``, ``vitb``, ``vitl``, ``vitg``) with overrides."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model {name!r}; known sizes: {', '.join(VIT_SIZES)}")
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown backbone option(s) {unknown}; valid options: {sorted(known)}")
    return ViTConfig(**{**VIT_SIZES[name], **overrides})


def size_name(cfg: ViTConfig) -> str | None:
    """The named size whose width, depth and heads match ``cfg``, if any."""
    for name, size in VIT_SIZES.items():
        if all(getattr(cfg, k) == size[k] for k in ("embed_dim", "depth", "num_heads")):
            return name
    return None


@dataclass
class ModelConfig:
    """A named size plus overrides: the ``model`` group of a training run (conf/model/*.yaml), and its Hydra
    schema node. A different concept from ``ViTConfig``: it names a size (``arch``) instead of its
    dimensions, and leaves ``ffn_layer`` and the interpolation to the size and to DINOv2's conventions
    when null. ``vit_config`` gives the full backbone config."""

    arch: str = "vitl"  # one of VIT_SIZES
    patch_size: int = ViTConfig.patch_size
    num_register_tokens: int = ViTConfig.num_register_tokens  # a training run: the top-level `registers`
    ffn_layer: str | None = None  # one of FFN_KINDS; None: the size's own (swiglu for vitg)
    drop_path_rate: float = 0.3  # student only; the teacher never drops
    drop_path_uniform: bool = ViTConfig.drop_path_uniform
    layerscale_init: float | None = ViTConfig.layerscale_init
    qkv_bias: bool = ViTConfig.qkv_bias
    proj_bias: bool = ViTConfig.proj_bias
    ffn_bias: bool = ViTConfig.ffn_bias
    interpolate_antialias: bool | None = None  # None: on with registers (DINOv2 reg models), else off
    interpolate_offset: float | None = None  # None: 0 with registers, else 0.1
    register_pos_embed: bool = ViTConfig.register_pos_embed  # ablation: learned positions for registers
    register_init_std: float = ViTConfig.register_init_std  # DINOv2; 0.02 as DINOv3 separates registers sooner
    attn_backend: str = "auto"  # one of ATTN_BACKENDS
    attn_bias: str = ViTConfig.attn_bias  # one of ATTN_BIASES: none, or kv (a learned key/value sink per head)
    pretrained_weights: str | None = None  # an official DINOv2 backbone file, loaded into the student

    def vit_config(self, img_size: int, **dimensions) -> ViTConfig:
        """The backbone of this size with these overrides, its positional table stored at ``img_size``
        (a training run: the global-crop size, as DINOv2 does, so global crops need no interpolation).
        ``dimensions``: further ``ViTConfig`` fields this group does not hold (``embed_dim``, ``depth``, ...)."""
        names = {f.name for f in dataclasses.fields(ViTConfig)}
        overrides = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        if overrides.get("ffn_layer") is None:
            overrides.pop("ffn_layer")
        return vit_config(self.arch, img_size=img_size, **overrides, **dimensions)

    @classmethod
    def split(cls, settings: Mapping) -> tuple[ModelConfig, dict]:
        """A saved ``model`` group (plus overrides) as this class and the further ``ViTConfig`` fields it
        carries; keys that are neither (written by another version) are left out, as before."""
        own = {f.name for f in dataclasses.fields(cls)}
        vit = {f.name for f in dataclasses.fields(ViTConfig)}
        return cls(**{k: v for k, v in settings.items() if k in own}), {
            k: v for k, v in settings.items() if k in vit and k not in own
        }

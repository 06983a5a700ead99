"""Hugging Face ``transformers`` interop: a vitreg backbone as a ``Dinov2WithRegistersModel`` / ``Dinov2Model``
folder (``config.json`` + ``model.safetensors``), and back.

The folder holds the keys ``save_pretrained`` writes (``embeddings.*``, ``encoder.layer.<i>.attention.attention.
query|key|value``, ``attention.output.dense``, ``layer_scale1.lambda1``, ``mlp.fc1|fc2`` or ``mlp.weights_in|
weights_out`` for SwiGLU, ``layernorm``): transformers 4.x reads them as they are and 5.x converts them on load.
The mapping is written from the module layout of ``modeling_dinov2.py``; no transformers import is needed.

What HF cannot express is handled so the outputs stay equal:
- no LayerScale: HF always multiplies by ``lambda1``, so ones are written (``x * 1.0 == x`` exactly);
- a missing attention-output or FFN bias: HF always has one, so zeros are written;
- positional interpolation: ``Dinov2WithRegistersModel`` resamples bicubic with antialias at the exact size,
  ``Dinov2Model`` bicubic without antialias at the exact size. The class whose interpolation equals the
  model's is chosen (a 0-register model trained with antialias becomes a ``Dinov2WithRegistersModel`` with
  0 registers); when neither matches (DINOv2's legacy offset 0.1), outputs agree at the native size only
  and ``interpolation_mismatch`` says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from vitreg.models.config import ViTConfig
from vitreg.models.layers import ffn_hidden_dim
from vitreg.models.vision_transformer import VisionTransformer
from vitreg.utils.io import atomic_write_bytes

HF_REGISTERS = "Dinov2WithRegistersModel"
HF_PLAIN = "Dinov2Model"
MODEL_TYPES = {HF_REGISTERS: "dinov2_with_registers", HF_PLAIN: "dinov2"}
# (antialias, offset) each HF class resamples its positional table with (offset 0 = the exact-size path)
HF_INTERPOLATION: dict[str, tuple[bool, float]] = {HF_REGISTERS: (True, 0.0), HF_PLAIN: (False, 0.0)}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# hub-layout key suffix inside ``blocks.<i>.`` -> HF suffix inside ``encoder.layer.<i>.`` (one to one)
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.w12.weight": "mlp.weights_in.weight",
    "mlp.w12.bias": "mlp.weights_in.bias",
    "mlp.w3.weight": "mlp.weights_out.weight",
    "mlp.w3.bias": "mlp.weights_out.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_QKV = ("query", "key", "value")


class ExportError(ValueError):
    """The model has something the target library cannot represent; the message says what and why."""


def hf_architecture(cfg: ViTConfig) -> str:
    """The HF class to export to: the one whose positional interpolation equals the model's, else by registers."""
    interp = (cfg.antialias, cfg.offset)
    if cfg.num_register_tokens or interp == HF_INTERPOLATION[HF_REGISTERS]:
        return HF_REGISTERS
    return HF_PLAIN


def interpolation_mismatch(cfg: ViTConfig, target: str, target_interp: tuple[bool, float]) -> str | None:
    """A warning when ``target`` resamples positions differently from the model (outputs then agree only at
    the native grid), else None."""
    antialias, offset = target_interp
    if (cfg.antialias, cfg.offset) == (antialias, offset):
        return None
    legacy = " (DINOv2's legacy path for models without registers)" if cfg.offset else ""
    return (
        f"this model resamples its positional embeddings with interpolate_antialias={cfg.antialias}, "
        f"interpolate_offset={cfg.offset}{legacy}; {target} uses antialias={antialias} at the exact size. "
        f"Outputs are equal at the native {cfg.img_size}x{cfg.img_size} px input and differ at other image sizes. "
        "Train with model.interpolate_antialias=true model.interpolate_offset=0 to match at every size."
    )


def integer_mlp_ratio(embed_dim: int, hidden: int, ffn_layer: str) -> int | None:
    """The integer ``mlp_ratio`` that makes DINOv2/HF's hidden-size rule give ``hidden``, if there is one."""
    for ratio in range(1, 65):
        if ffn_hidden_dim(embed_dim, float(ratio), ffn_layer) == hidden:
            return ratio
    return None


def hf_config(cfg: ViTConfig, architecture: str | None = None) -> dict:
    """The ``config.json`` contents for ``cfg`` (only keys both transformers 4.x and 5.x understand)."""
    architecture = architecture or hf_architecture(cfg)
    if cfg.register_pos_embed:
        raise ExportError("register positional embeddings (model.register_pos_embed=true) have no HF equivalent")
    if cfg.attn_bias != "none":
        raise ExportError(f"attention-bias sinks (model.attn_bias={cfg.attn_bias}) have no HF equivalent")
    ratio = integer_mlp_ratio(cfg.embed_dim, cfg.hidden_dim, cfg.ffn_layer)
    if ratio is None:  # HF derives the FFN width from an integer mlp_ratio; it has no intermediate_size
        raise ExportError(
            f"the {cfg.ffn_layer} FFN has hidden width {cfg.hidden_dim}, which no integer mlp_ratio gives for "
            f"hidden_size {cfg.embed_dim} in HF's Dinov2 (it has no intermediate_size key)"
        )
    config = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": ratio,
        "hidden_act": "gelu",  # exact GELU, as nn.GELU(); unused by SwiGLU
        "use_swiglu_ffn": cfg.ffn_layer == "swiglu",
        "layer_norm_eps": 1e-6,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "layerscale_value": 1.0,  # the stored lambda1 tensors are what counts
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
    if architecture == HF_REGISTERS:
        config["num_register_tokens"] = cfg.num_register_tokens
    else:
        config["use_mask_token"] = True
    return config


def hf_state_dict(model: VisionTransformer) -> dict[str, Tensor]:
    """The backbone's tensors under HF's keys (contiguous CPU copies), ready for ``model.safetensors``."""
    cfg = model.cfg
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dim, hidden = cfg.embed_dim, cfg.hidden_dim
    out: dict[str, Tensor] = {}
    for key, hf_key in _TOP_RENAMES.items():
        if key in state:
            out[hf_key] = state[key]
    if cfg.num_register_tokens == 0 and hf_architecture(cfg) == HF_REGISTERS:
        out["embeddings.register_tokens"] = state["cls_token"].new_zeros(1, 0, dim)
    ffn_out = "fc2" if cfg.ffn_layer == "mlp" else "w3"
    for i in range(cfg.depth):
        block = {k[len(f"blocks.{i}.") :]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        ones = torch.ones(dim, dtype=block["norm1.weight"].dtype)
        block.setdefault("ls1.gamma", ones)  # no LayerScale: HF multiplies by lambda1 anyway
        block.setdefault("ls2.gamma", ones.clone())
        block.setdefault("attn.proj.bias", torch.zeros(dim, dtype=ones.dtype))  # HF always has this bias
        if cfg.ffn_layer == "mlp":
            block.setdefault("mlp.fc1.bias", torch.zeros(hidden, dtype=ones.dtype))
        else:
            block.setdefault("mlp.w12.bias", torch.zeros(2 * hidden, dtype=ones.dtype))
        block.setdefault(f"mlp.{ffn_out}.bias", torch.zeros(dim, dtype=ones.dtype))
        prefix = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            if f"attn.qkv.{kind}" in block:  # fused in DINOv2, three Linears in HF
                parts = block.pop(f"attn.qkv.{kind}").chunk(3)
                for part, name in zip(parts, _QKV, strict=True):
                    out[f"{prefix}attention.attention.{name}.{kind}"] = part.clone()  # safetensors refuses views
        for key, value in block.items():
            out[prefix + _BLOCK_RENAMES[key]] = value
    return {k: v.contiguous() for k, v in out.items()}


def save_safetensors(state: Mapping[str, Tensor], path: str | PathLike, metadata: dict | None = None) -> Path:
    """Write ``state`` as a safetensors file, atomically."""
    data = safetensors.torch.save(dict(state), metadata={"format": "pt", **(metadata or {})})
    return atomic_write_bytes(path, data)


def load_safetensors(path: str | PathLike) -> dict[str, Tensor]:
    """Tensors of a safetensors file (the format holds raw tensors only: nothing can run from it)."""
    return safetensors.torch.load_file(str(path), device="cpu")


def save_hf_folder(model: VisionTransformer, folder: str | PathLike, architecture: str | None = None) -> dict:
    """Write ``config.json`` + ``model.safetensors`` into ``folder``; returns the config written."""
    folder = Path(folder)
    config = hf_config(model.cfg, architecture)
    state = hf_state_dict(model)
    config["torch_dtype"] = str(state["layernorm.weight"].dtype).removeprefix("torch.")  # as stored
    save_safetensors(state, folder / WEIGHTS_NAME)
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return config


# ------------------------------------------------------------------ import
def is_hf_folder(path: str | PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def looks_like_hf_state(state: Mapping) -> bool:
    return "embeddings.patch_embeddings.projection.weight" in state or any(
        k.startswith(("encoder.layer.", "dinov2.", "dinov2_with_registers.")) for k in state
    )


_REVERSE_TOP = {v: k for k, v in _TOP_RENAMES.items()}
_REVERSE_BLOCK = {v: k for k, v in _BLOCK_RENAMES.items()}
# transformers 5.x module names, in case a state dict comes from a live 5.x model instead of a file
_V5_BLOCK = {
    "attention.o_proj.": "attention.output.dense.",
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "mlp.down_proj.": "mlp.weights_out.",
}


def hub_state_dict_from_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF Dinov2 tensors (file keys, or a 5.x model's ``state_dict()``) -> vitreg/DINOv2 hub keys.

    A ``dinov2.`` / ``dinov2_with_registers.`` prefix (task models) is removed and heads are dropped."""
    for prefix in ("dinov2_with_registers.", "dinov2."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    renamed: dict[str, Tensor] = {}
    gate_up: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        for new, old in _V5_BLOCK.items():
            key = key.replace(new, old)
        if ".mlp.gate_proj." in key or ".mlp.up_proj." in key:  # 5.x splits weights_in in two
            stem, part, kind = key.rpartition(".mlp.")[0], key.split(".mlp.")[1].split(".")[0], key.rsplit(".", 1)[1]
            gate_up.setdefault(f"{stem}.mlp.weights_in.{kind}", {})[part] = value
            continue
        renamed[key] = value
    for key, parts in gate_up.items():
        renamed[key] = torch.cat((parts["gate_proj"], parts["up_proj"]))
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in renamed.items():
        if key in _REVERSE_TOP:
            out[_REVERSE_TOP[key]] = value
            continue
        if not key.startswith("encoder.layer."):
            continue  # classifier heads, pooler: not part of the backbone
        index, rest = key[len("encoder.layer.") :].split(".", 1)
        if rest.startswith("attention.attention."):
            name, kind = rest[len("attention.attention.") :].split(".")
            qkv.setdefault(f"blocks.{index}.attn.qkv.{kind}", {})[name] = value
        elif rest in _REVERSE_BLOCK:
            out[f"blocks.{index}.{_REVERSE_BLOCK[rest]}"] = value
        else:
            raise ValueError(f"unknown HF Dinov2 key {key!r}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts[name] for name in _QKV])
    if "register_tokens" in out and out["register_tokens"].shape[1] == 0:
        del out["register_tokens"]  # a 0-register Dinov2WithRegistersModel
    return out


def vit_config_from_hf(config: Mapping, **overrides) -> dict:
    """ViTConfig keywords from an HF Dinov2 ``config.json`` (interpolation as the HF class does it)."""
    architecture = (config.get("architectures") or [None])[0]
    registers = config.get("model_type") == "dinov2_with_registers" or architecture == HF_REGISTERS
    patch = config.get("patch_size", 14)
    image = config.get("image_size", 518)
    if isinstance(patch, (list, tuple)) or isinstance(image, (list, tuple)):
        if len(set(patch if isinstance(patch, (list, tuple)) else [patch])) != 1:
            raise ValueError(f"non-square patches {patch} are not supported")
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        image = image[0] if isinstance(image, (list, tuple)) else image
    antialias, offset = HF_INTERPOLATION[HF_REGISTERS if registers else HF_PLAIN]
    if config.get("hidden_act", "gelu") != "gelu" and not config.get("use_swiglu_ffn"):
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (vitreg's MLP uses exact GELU)")
    if float(config.get("layer_norm_eps", 1e-6)) != 1e-6:
        raise ValueError(f"layer_norm_eps {config['layer_norm_eps']} is not supported (vitreg uses 1e-6)")
    kwargs = {
        "embed_dim": int(config["hidden_size"]),
        "depth": int(config["num_hidden_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "patch_size": int(patch),
        "img_size": int(image) // int(patch) * int(patch),
        "in_chans": int(config.get("num_channels", 3)),
        "mlp_ratio": float(config.get("mlp_ratio", 4)),
        "ffn_layer": "swiglu" if config.get("use_swiglu_ffn") else "mlp",
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "num_register_tokens": int(config.get("num_register_tokens", 4)) if registers else 0,
        "layerscale_init": 1.0,  # HF always has LayerScale (ones when the source had none)
        "interpolate_antialias": antialias,
        "interpolate_offset": offset,
    }
    return {**kwargs, **overrides}


def read_hf_folder(folder: str | PathLike) -> tuple[dict, dict[str, Tensor]]:
    """``(config.json contents, hub-layout tensors)`` of an HF Dinov2 folder; never unpickles."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES.values():
        raise ValueError(
            f"{folder} is a Hugging Face folder for model_type {model_type!r}; only Dinov2 "
            f"({', '.join(MODEL_TYPES.values())}) folders can be read"
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors", ".json", ".pth"))
        hint = (
            " It holds a pickled pytorch_model.bin, which vitreg never unpickles: re-save it with "
            "`Dinov2Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`."
            if (folder / "pytorch_model.bin").exists()
            else " Sharded safetensors (model-0000x-of-0000y) are not read: save it as one file."
        )
        raise ValueError(f"{folder} has no {WEIGHTS_NAME} (files: {', '.join(others) or 'none'}).{hint}")
    return config, hub_state_dict_from_hf(load_safetensors(weights))

"""One reader for every backbone source vitreg accepts, and a guess of the format when it refuses one.

``read_backbone_source`` takes a file, a directory or a mapping and returns the backbone's tensors in the
DINOv2 hub layout, plus the architecture settings the format states but the tensors cannot tell (heads,
positional interpolation). Accepted:
- DINOv2 files in every layout of ``vitreg.models.checkpoint`` and vitreg Lightning checkpoints (``.ckpt``);
- FSDP2 sharded checkpoint directories (``.metadata`` + ``__<rank>_0.distcp`` + ``meta.pt``);
- Hugging Face Dinov2 folders (``config.json`` + ``model.safetensors``);
- timm DINOv2-style ViT state dicts (``.safetensors`` or ``.pth``/``.bin`` read weights-only).
A ``vitreg_export.json`` written beside an export restores the original settings (heads, interpolation,
no LayerScale), so an export read back is the model that was exported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from vitreg.models.checkpoint import extract_backbone_state_dict, load_checkpoint_file
from vitreg.models.export_hf import (
    HF_INTERPOLATION,
    HF_PLAIN,
    HF_REGISTERS,
    hub_state_dict_from_hf,
    is_hf_folder,
    load_safetensors,
    looks_like_hf_state,
    read_hf_folder,
    vit_config_from_hf,
)
from vitreg.models.export_timm import TIMM_INTERPOLATION, hub_state_dict_from_timm, looks_like_timm_state
from vitreg.utils.sharded import is_sharded_checkpoint, read_sharded_checkpoint

log = logging.getLogger(__name__)
RECORD_NAME = "vitreg_export.json"


@dataclass
class BackboneSource:
    state: dict[str, Tensor]  # hub layout
    format: str  # "dinov2" (DINOv2 layouts and vitreg checkpoints), "hf", "timm"
    config: dict[str, Any] = field(default_factory=dict)  # ViTConfig keywords the format states
    checkpoint: Mapping | None = None  # the raw container (hyper_parameters, global_step of vitreg checkpoints)
    test_time_registers: dict | None = None  # an export of a TTR model: its register neurons and settings


def read_export_record(path: str | PathLike) -> dict | None:
    """The ``vitreg_export.json`` entry for an exported file or HF folder, if one was written."""
    path = Path(path)
    record_file, name = (
        (path / RECORD_NAME, "model.safetensors") if path.is_dir() else (path.parent / RECORD_NAME, path.name)
    )
    if not record_file.is_file():
        return None
    try:
        return json.loads(record_file.read_text()).get(name)
    except (ValueError, AttributeError):
        log.warning("ignoring %s: not a vitreg export record", record_file)
        return None


def config_from_record(record: Mapping) -> dict[str, Any]:
    """ViTConfig keywords an export record restores (what the target format could not hold)."""
    return {
        "num_heads": record["num_heads"],
        "interpolate_antialias": record["interpolation"]["antialias"],
        "interpolate_offset": record["interpolation"]["offset"],
        "layerscale_init": 1.0 if record["layerscale"] else None,
    }


def _drop_unit_layerscale(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove LayerScale gammas that are all ones (written for a model that had none): same outputs."""
    gammas = [k for k in state if k.endswith((".ls1.gamma", ".ls2.gamma"))]
    if gammas and all(bool((state[k] == 1).all()) for k in gammas):
        return {k: v for k, v in state.items() if k not in gammas}
    return state


def _from_mapping(raw: Mapping, which: Literal["teacher", "student"]) -> BackboneSource:
    if not isinstance(raw, Mapping):
        extract_backbone_state_dict(raw, which)  # raises: not a state dict
    inner = raw
    for key in ("state_dict", "model"):  # timm / HF training containers
        if isinstance(inner.get(key), Mapping) and not any(k.startswith(("teacher", "student")) for k in inner[key]):
            inner = inner[key]
    if looks_like_hf_state(inner):
        state = hub_state_dict_from_hf(inner)
        interp = HF_INTERPOLATION[HF_REGISTERS if "register_tokens" in state else HF_PLAIN]
        return BackboneSource(state, "hf", _interp(interp), raw)
    if looks_like_timm_state(inner):
        return BackboneSource(hub_state_dict_from_timm(inner), "timm", _interp(TIMM_INTERPOLATION), raw)
    try:
        return BackboneSource(extract_backbone_state_dict(raw, which), "dinov2", {}, raw)
    except ValueError as err:
        raise ValueError(f"{err}\n{guess_format(raw)}") from None


def _interp(pair: tuple[bool, float]) -> dict[str, Any]:
    return {"interpolate_antialias": pair[0], "interpolate_offset": pair[1]}


def read_backbone_source(
    source: str | PathLike | Mapping, which: Literal["teacher", "student"] = "teacher"
) -> BackboneSource:
    """The backbone tensors (hub layout) of any accepted source; see the module docstring."""
    if not isinstance(source, (str, PathLike)):
        return _from_mapping(source, which)
    path = Path(source)
    if path.is_dir():
        if is_hf_folder(path):
            config, state = read_hf_folder(path)
            found = BackboneSource(state, "hf", vit_config_from_hf(config), dict(config))
        elif is_sharded_checkpoint(path):
            checkpoint = read_sharded_checkpoint(path, f"state_dict.objective.{which}.backbone.")
            found = BackboneSource(extract_backbone_state_dict(checkpoint, which), "dinov2", {}, checkpoint)
        else:
            raise ValueError(f"{path} is a directory but not a backbone source.\n{guess_directory(path)}")
    elif not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    elif path.suffix == ".safetensors":
        found = _from_mapping(load_safetensors(path), which)
    else:
        found = _from_mapping(load_checkpoint_file(path), which)
    record = read_export_record(path)
    if record is not None:
        found.config = {**found.config, **config_from_record(record)}
        found.test_time_registers = record.get("test_time_registers")
        if not record["layerscale"]:
            found.state = _drop_unit_layerscale(found.state)
    return found


# ------------------------------------------------------------------ refusals
_CONVERT = "python scripts/export_backbone.py SOURCE --format dinov2|hf|timm --out PATH"


def guess_format(raw: Mapping) -> str:
    """What a mapping that is not a DINOv2 backbone looks like, and what to do with it."""
    keys = list(raw)
    nested = {k: list(v) for k, v in raw.items() if isinstance(v, Mapping) and k in ("state_dict", "model", "teacher")}
    flat = keys + [f"{outer}.{k}" for outer, inner in nested.items() for k in inner]
    text = " ".join(flat[:2000])

    def has(*parts: str) -> bool:
        return any(p in text for p in parts)

    if has("storage_tokens", "rope_embed"):
        guess = (
            "a DINOv3 backbone (RoPE positions, storage tokens): vitreg's backbone has learned absolute positions, "
            "so it cannot be loaded"
        )
    elif has("visual.class_embedding", "visual.trunk.", "text_projection"):
        guess = "a CLIP / OpenCLIP model: not a DINOv2 backbone"
    elif has("optimizer_states", "pytorch-lightning_version") and not has("backbone."):
        guess = (
            "a Lightning checkpoint without a DINOv2 backbone under objective.teacher/student.backbone: "
            "not a vitreg pretraining checkpoint"
        )
    elif has("dino_head.") and not has("backbone."):
        guess = "DINO/iBOT heads only, no backbone"
    elif has("stem.", "stages.", "layers.0.downsample"):
        guess = "a convolutional or hierarchical (Swin/ConvNeXt-style) model: not a ViT with a class token"
    elif has("encoder.layers.", "vit.encoder.layer."):
        guess = "a Hugging Face ViT that is not Dinov2 (only Dinov2 / Dinov2WithRegisters folders are read)"
    else:
        guess = f"nothing vitreg knows (first keys: {', '.join(keys[:6]) or 'none'})"
    return (
        f"It looks like {guess}. vitreg reads DINOv2 files (hub, chunked, teacher, trainer layouts), vitreg .ckpt "
        "files and sharded checkpoint directories, Hugging Face Dinov2 folders (config.json + model.safetensors) "
        f"and timm DINOv2 ViT state dicts; a vitreg run converts to any of them with `{_CONVERT}`."
    )


def guess_directory(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())[:12]
    if (path / "checkpoints").is_dir() or any(n.endswith(".ckpt") for n in names):
        return (
            f"It looks like a vitreg run directory: pass one checkpoint (e.g. {path}/checkpoints/last.ckpt), "
            f"or export the run's newest checkpoint with `{_CONVERT.replace('SOURCE', str(path))}`."
        )
    if (path / "pytorch_model.bin").exists() or (path / "model.safetensors").exists():
        return "It looks like a Hugging Face folder without config.json: save it with save_pretrained()."
    if any(n.endswith(".distcp") for n in names):
        return "It looks like an incomplete sharded checkpoint (no .metadata: the save was interrupted)."
    return f"It holds: {', '.join(names) or 'nothing'}."

"""Loading a backbone from any checkpoint a user has: the one place that turns a file into a model.

Reads what ``vitreg.models.formats`` recognises (a vitreg Lightning ``.ckpt``, an FSDP2 sharded
checkpoint directory, an official DINOv2 ``.pth`` in any layout, a Hugging Face Dinov2 folder, a timm
state dict) and loads it strictly. ``load_backbone`` rebuilds a vitreg checkpoint from its training
config; ``load_dinov2_backbone`` describes any file by its tensors alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Literal

from vitreg.models.checkpoint import infer_vit_config, load_backbone_weights
from vitreg.models.config import ModelConfig
from vitreg.models.formats import BackboneSource, read_backbone_source
from vitreg.models.test_time_registers import TestTimeRegisters, TestTimeRegisterSettings
from vitreg.models.vision_transformer import VisionTransformer


@dataclass
class LoadedBackbone:
    model: VisionTransformer
    source: str  # "vitreg" (a training checkpoint with its config), or weights only: "dinov2", "hf", "timm"
    step: int | None  # the training step of a vitreg checkpoint
    train_resolution: int  # the global crop size it was trained at (224 for official weights)


def load_backbone(
    path: str | os.PathLike,
    which: Literal["teacher", "student"] = "teacher",
    test_time_registers: bool = True,
    **overrides,
) -> LoadedBackbone:
    """The backbone of any supported checkpoint, loaded strictly: a file, an FSDP2 sharded checkpoint
    directory, a Hugging Face Dinov2 folder or a timm state dict (``vitreg.models.formats``).

    vitreg checkpoints carry their training config, so the architecture (incl. interpolation
    settings) is rebuilt from it; official files are described by their tensors (DINOv2's
    conventions for register models apply: antialiased interpolation, offset 0), HF and timm
    exports by their format (and ``vitreg_export.json`` when present). An export of a model with test-time
    registers comes back with them (``TestTimeRegisters``) unless ``test_time_registers=False``."""
    found = read_backbone_source(path, which)
    checkpoint, state = found.checkpoint, found.state
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    cfg = hparams.get("cfg") if isinstance(hparams, dict) else None
    if isinstance(cfg, dict) and "model" in cfg and "augment" in cfg:
        resolution = int(cfg["augment"]["global_crops_size"])
        model_cfg, dimensions = ModelConfig.split({**cfg["model"], **overrides})
        vit_cfg = model_cfg.vit_config(resolution, **dimensions)
        model = VisionTransformer(vit_cfg)
        source, step = "vitreg", checkpoint.get("global_step")
    else:
        model = VisionTransformer(infer_vit_config(state, **{**found.config, **overrides}))
        source, step, resolution = found.format, None, 224
    load_backbone_weights(model, state)
    return LoadedBackbone(_with_recorded_ttr(model, found, test_time_registers).eval(), source, step, resolution)


def load_dinov2_backbone(
    source: str | PathLike | Mapping,
    which: Literal["teacher", "student"] = "teacher",
    test_time_registers: bool = True,
    **overrides,
) -> VisionTransformer:
    """Build the architecture the checkpoint describes and load it strictly.

    ``source`` is a DINOv2 file in any layout above, a vitreg ``.ckpt`` or sharded checkpoint directory, a
    Hugging Face Dinov2 folder (``config.json`` + ``model.safetensors``) or a timm DINOv2 ViT state dict
    (see ``vitreg.models.formats``); anything else is refused with a guess of what it is.
    ``overrides`` set what the tensors cannot tell (``attn_backend``, ``drop_path_rate``,
    ``interpolate_antialias``/``interpolate_offset``, ``num_heads`` for non-64-dim heads) or
    assert architecture (a contradiction fails the strict check with the list of keys).
    An export of a model with test-time registers comes back with them unless ``test_time_registers=False``.
    """
    found = read_backbone_source(source, which)
    model = VisionTransformer(infer_vit_config(found.state, **{**found.config, **overrides}))
    return _with_recorded_ttr(load_backbone_weights(model, found.state), found, test_time_registers)


def _with_recorded_ttr(model: VisionTransformer, found: BackboneSource, wanted: bool) -> VisionTransformer:
    """The model with the test-time registers its export record names, if any and if wanted."""
    recorded = found.test_time_registers
    if not wanted or not recorded:
        return model
    settings = TestTimeRegisterSettings(**{k: v for k, v in recorded.items() if k != "neurons"})
    return TestTimeRegisters.from_backbone(model, recorded["neurons"], settings)

"""Pure-PyTorch backbone: DINOv2's ViT with N registers, and official-checkpoint interop.

Nothing here imports Lightning, Hydra or any other part of vitreg. The names below are the public API
that README.md, docs/export.md and scripts/ use; everything else is imported from its module.
"""

from vitreg.models.attention import xformers_available
from vitreg.models.checkpoint import (
    CheckpointMismatchError,
    export_dinov2_state_dict,
    infer_vit_config,
    load_backbone_weights,
    save_dinov2_checkpoint,
)
from vitreg.models.config import VIT_SIZES, ViTConfig, vit_config
from vitreg.models.layout import TokenLayout
from vitreg.models.load import LoadedBackbone, load_backbone, load_dinov2_backbone
from vitreg.models.pos_embed import interpolate_pos_embed
from vitreg.models.test_time_registers import TestTimeRegisters, TestTimeRegisterSettings
from vitreg.models.vision_transformer import VisionTransformer, build_vit

__all__ = [
    "VIT_SIZES",
    "CheckpointMismatchError",
    "LoadedBackbone",
    "TestTimeRegisterSettings",
    "TestTimeRegisters",
    "TokenLayout",
    "ViTConfig",
    "VisionTransformer",
    "build_vit",
    "export_dinov2_state_dict",
    "infer_vit_config",
    "interpolate_pos_embed",
    "load_backbone",
    "load_backbone_weights",
    "load_dinov2_backbone",
    "save_dinov2_checkpoint",
    "vit_config",
    "xformers_available",
]

"""DINOv2's optimizer parameter groups: layer-wise lr decay, patch-embed lr multiplier, no decay on norms/biases.

Each group carries ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``; ``apply_schedules`` turns the
scheduled lr / wd / last-layer lr into per-group values every iteration, as DINOv2's ``apply_optim_scheduler``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

# Embedding-level parameters share layer 0 with the patch embedding (registers joined in DINOv2 #283).
_LAYER0_KEYS: tuple[str, ...] = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
# ``blocks.<i>.`` or, with FSDP block chunks, ``blocks.<chunk>.<i>.`` (chunks keep global indices).
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.(?:(\d+)\.)?")


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, ``i + 1`` for block ``i``, ``num_layers + 1`` for anything else (final norm, heads)."""
    if any(key in name for key in _LAYER0_KEYS):
        return 0
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(2) or match.group(1)) + 1
    return num_layers + 1


def _backbone_depth(backbone: nn.Module) -> int:
    depth = getattr(backbone, "n_blocks", None)
    return int(depth) if depth is not None else len(backbone.blocks)


def _named_parameters(
    student: Mapping[str, nn.Module] | nn.Module,
) -> tuple[Iterator[tuple[str, nn.Parameter, bool]], int]:
    """Yield ``(name, param, is_backbone)`` with submodule-prefixed names, and the backbone depth."""
    if isinstance(student, nn.Module) and not hasattr(student, "backbone") and hasattr(student, "blocks"):
        # a bare backbone: every parameter is a backbone parameter
        return ((n, p, True) for n, p in student.named_parameters()), _backbone_depth(student)
    if isinstance(student, nn.Module) and not isinstance(student, nn.ModuleDict):
        named, backbone = student.named_parameters(), getattr(student, "backbone", None)
    else:
        modules = dict(student.items())  # a ModuleDict has no .get
        named = ((f"{key}.{n}", p) for key, module in modules.items() for n, p in module.named_parameters())
        backbone = modules.get("backbone")
    if backbone is None:
        raise ValueError("the student has no 'backbone' submodule, so layer-wise lr decay has no depth")
    return ((n, p, n.startswith("backbone.")) for n, p in named), _backbone_depth(backbone)


def param_groups(
    student: Mapping[str, nn.Module] | nn.Module, layerwise_decay: float, patch_embed_lr_mult: float
) -> list[dict]:
    """DINOv2's fused AdamW groups for a student ``{"backbone": ..., "dino_head": ..., "ibot_head": ...}``.

    Per parameter (DINOv2's ``get_params_groups_with_decay``):
    - ``lr_multiplier = layerwise_decay ** (depth + 1 - layer_id)`` for ``backbone.*`` and 1 for head parameters
      (DINOv2 sees heads as zero-block models: ``decay ** (0 + 1 - 1)``); ``× patch_embed_lr_mult`` on patch_embed;
    - ``wd_multiplier = 0`` for names ending ``.bias`` or containing ``norm`` / ``gamma``, else 1
      (so pos_embed, cls/register/mask tokens and the last layer's weight_g are decayed);
    - ``is_last_layer`` for names containing ``last_layer`` (its lr is 0 while the last layer is frozen).

    Parameters with equal (lr_multiplier, wd_multiplier, is_last_layer) are fused into one group, in order of
    first appearance; each group also lists its parameter ``names``. Frozen parameters are skipped.
    A bare backbone (a module with ``blocks``) is accepted too.
    """
    named, depth = _named_parameters(student)
    groups: dict[tuple[float, float, bool], dict] = {}
    seen: set[int] = set()
    for name, param, is_backbone in named:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        # heads count as zero-block models in DINOv2: decay ** (0 + 1 - 1) = 1
        lr_mult = layerwise_decay ** (depth + 1 - layer_id(name, depth)) if is_backbone else 1.0
        if "patch_embed" in name:
            lr_mult = lr_mult * patch_embed_lr_mult
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        is_last = "last_layer" in name
        group = groups.setdefault(
            (lr_mult, wd_mult, is_last),
            {"params": [], "names": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": is_last},
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Write this iteration's lr and weight decay into every group, scaled by the group's multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]

"""Per-block ``torch.compile`` of the student and teacher backbones, applied from outside the model.

As torchtitan and DINOv3 do: every transformer block is compiled in place (``nn.Module.compile`` with
``fullgraph=True, dynamic=False``), so the module tree, parameter names and state-dict keys stay the same:
checkpoints, the EMA's name matching, param groups and FSDP2's per-block ``fully_shard`` see the modules they
always saw. Compile before sharding (``DINOv2Module.configure_model``). The heads and the loss terms are
compiled too when their input shapes are static, i.e. when iBOT's masked tokens are padded to the batch's
upperbound (``ssl.ibot.pad_masked_tokens``, the default); unpadded, the masked count changes every batch and
would recompile them every step, so they stay eager. The teacher targets (centering, Sinkhorn-Knopp) hold
collectives and stay eager.

``trainer.compile``: true / false, or null (the default) for on when training on CUDA. The backend is
inductor; ``VITREG_COMPILE_BACKEND`` (e.g. ``aot_eager``) replaces it, which the CPU tests use.
"""

from __future__ import annotations

import logging
import os

import torch
import torch._dynamo
from torch import nn

from vitreg.models.attention import resolve_attention_kernels
from vitreg.ssl.objective import DINOv2Objective

log = logging.getLogger(__name__)

COMPILE_BACKEND_ENV = "VITREG_COMPILE_BACKEND"
DEFAULT_BACKEND = "inductor"
# Input shapes allowed per distinct block setting before dynamo gives up (its own default per code object).
SHAPES_PER_SETTING = 8


def compile_wanted(setting: bool | None, device: torch.device) -> bool:
    """``trainer.compile`` for a run on ``device``: an explicit true/false wins; null means on with CUDA."""
    return device.type == "cuda" if setting is None else bool(setting)


def is_compiled(module: nn.Module) -> bool:
    """True when ``module.compile()`` was applied (the compiled call replaces the module's ``__call__``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_blocks(backbone: nn.Module, device: torch.device, backend: str = DEFAULT_BACKEND) -> int:
    """Compile every block of a ``VisionTransformer`` in place, once; returns how many were compiled now.

    The attention kernel is resolved for ``device`` first, so the traced blocks only read its name.
    """
    resolve_attention_kernels(backbone, device)
    newly = 0
    for block in backbone.blocks:
        if not is_compiled(block):  # Lightning calls configure_model for every fit/validate: compile once
            block.compile(backend=backend, fullgraph=True, dynamic=False)
            newly += 1
    return newly


def _allow_recompiles(backbones: list[nn.Module]) -> None:
    # Every compiled block runs the same code (Module._call_impl), and dynamo limits the graphs of one code
    # object: one per distinct block setting (drop-path rate, train/eval) and input shape. With fullgraph=True
    # going over the limit is a hard error mid-run (e.g. a probe's new batch shape, or per-block drop-path
    # rates), so allow a few shapes for every distinct setting.
    settings = {(id(backbone), block.drop_path) for backbone in backbones for block in backbone.blocks}
    needed = SHAPES_PER_SETTING * len(settings)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)


def compile_objective(
    objective: nn.Module, setting: bool | None, device: torch.device, backend: str | None = None
) -> bool:
    """Compile the blocks of the student and teacher backbones of a ``DINOv2Objective`` when ``setting``
    (``trainer.compile``) asks for it on ``device``; returns whether they are compiled. Idempotent."""
    if not compile_wanted(setting, device):
        return False
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV, DEFAULT_BACKEND)
    backbones = [objective.student.backbone, objective.teacher.backbone]
    _allow_recompiles(backbones)
    newly = sum(compile_blocks(backbone, device, backend) for backbone in backbones)
    heads = compile_heads_and_losses(objective, backend)
    if newly or heads:
        log.info(
            "torch.compile (%s, fullgraph, static shapes): %d backbone blocks of student and teacher, %d heads "
            "and loss modules",
            backend,
            newly,
            heads,
        )
    return True


def compile_heads_and_losses(objective: nn.Module, backend: str = DEFAULT_BACKEND) -> int:
    """Compile the student's and teacher's heads and the loss terms in place when their shapes are static
    (no iBOT, or iBOT padded to the upperbound); returns how many were compiled now."""
    if not isinstance(objective, DINOv2Objective) or (objective.do_ibot and not objective.cfg.ibot.pad_masked_tokens):
        return 0
    heads = [m for tree in (objective.student, objective.teacher) for name, m in tree.items() if name != "backbone"]
    newly = 0
    for module in [*heads, objective.losses]:
        if not is_compiled(module):
            module.compile(backend=backend, fullgraph=True, dynamic=False)
            newly += 1
    return newly

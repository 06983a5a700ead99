"""Distributed training: ``trainer=ddp`` (DDPStrategy) and ``trainer=fsdp`` (FSDP2 through Lightning's
``ModelParallelStrategy``). See docs/distributed.md.

FSDP2 layout (``shard_objective``), as DINOv2 wraps its modules with FSDP:

* every student and teacher backbone block is its own ``fully_shard`` unit, then each backbone (its
  embeddings, tokens and final norm), then each head. There is no common root above them: like DINOv2,
  where each of student/teacher × backbone/heads is a root FSDP module, each top-level module is an FSDP2
  root. This lets callbacks forward ``teacher.backbone`` alone (the kNN probe, on every rank) before any
  training step. Telemetry gathers a plain fp32 copy on rank 0 instead (``unsharded_copy``).
* the teacher is sharded exactly like the student (same mesh, same ``Shard(0)`` placement per parameter),
  so the EMA update is a local, shard-by-shard operation with no communication. The teacher always
  reshards after its forward: its parameters are then the sharded ones when the EMA writes into them.
* mixed precision is FSDP2's own (``MixedPrecisionPolicy``): parameters are all-gathered in
  ``param_dtype``, the sharded fp32 parameters stay the optimiser's master weights, and gradients are
  reduce-scattered in ``reduce_dtype`` (backbones) or ``head_reduce_dtype`` (heads, fp32 as in DINOv2).
  Lightning's own precision stays ``32-true`` (no autocast on top).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from omegaconf import DictConfig
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from vitreg.utils.distributed import broadcast_module_, rank_and_world
from vitreg.utils.io import fsync_directory, load_weights_only
from vitreg.utils.sharded import read_sharded_metadata

log = logging.getLogger(__name__)

# The backbone returns views (``x_norm[:, 0]``...); FSDP2 warns that an in-place op on such a view would skip
# its pre-backward hook. The objective only uses them out of place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Backbone methods that run a forward: FSDP2 hooks ``forward`` only, so these must be registered.
FORWARD_METHODS = ("forward_features", "get_intermediate_layers", "get_attention_maps")
_WORLD_SIZE_KEY = "vitreg_distributed"


def ddp_find_unused_parameters(cfg: DictConfig) -> bool:
    """``trainer.ddp.find_unused_parameters``, or when null, whether some student parameter can get no
    gradient: ``mask_token`` is used only when the global crops are masked (with iBOT, or without it
    unless ``ssl.ibot.mask_when_off=false``), and the DINO head gets a gradient only from the DINO loss
    or from iBOT sharing it. With the default recipe every parameter gets a gradient."""
    explicit = cfg.trainer.ddp.find_unused_parameters
    if explicit is not None:
        return bool(explicit)
    ibot = cfg.ssl.ibot
    ibot_on, dino_on = ibot.loss_weight > 0, cfg.ssl.dino.loss_weight > 0
    mask_token_used = ibot_on or bool(ibot.get("mask_when_off", True))
    dino_head_used = dino_on or (ibot_on and not ibot.separate_head)
    return not (mask_token_used and dino_head_used)


def build_strategy(cfg: DictConfig) -> str | Strategy:
    """The ``strategy=`` argument of ``L.Trainer`` for ``cfg.trainer.strategy``.

    ``ddp`` and ``fsdp`` (FSDP2) are built here; any other value (``auto``, ``ddp_spawn``...) goes to
    Lightning unchanged. Lightning reads devices and nodes from the Trainer, and under SLURM
    (``srun`` with ``--ntasks-per-node`` = ``trainer.devices``) or torchrun it uses their processes
    instead of spawning its own.
    """
    kind = cfg.trainer.strategy
    if kind == "ddp":
        ddp = cfg.trainer.ddp
        return VitregDDPStrategy(
            find_unused_parameters=ddp_find_unused_parameters(cfg),
            static_graph=bool(ddp.static_graph),
            gradient_as_bucket_view=bool(ddp.gradient_as_bucket_view),
            **ddp_comm_hook(ddp.comm_hook),
        )
    if kind == "fsdp":
        return FSDP2Strategy()
    return kind


def ddp_comm_hook(name: str) -> dict[str, Any]:
    """DDPStrategy keyword arguments for ``trainer.ddp.comm_hook``: ``bf16`` casts each gradient bucket to
    bf16 for the all-reduce and back (half the bytes on the wire; the averaged gradients are rounded to
    bf16 precision, so the run is no longer bitwise the fp32 one)."""
    if name == "none":
        return {}
    if name == "bf16":
        return {"ddp_comm_hook": default_hooks.bf16_compress_hook}
    raise ValueError(f"trainer.ddp.comm_hook must be none or bf16, got {name!r}")


def saved_world_size(checkpoint: dict[str, Any]) -> int | None:
    """The world size a checkpoint was written with (None if unknown)."""
    info = checkpoint.get(_WORLD_SIZE_KEY)
    if info:
        return int(info["world_size"])
    hparams = checkpoint.get("hyper_parameters") or {}
    return int(hparams["world_size"]) if "world_size" in hparams else None


def sharded_checkpoint_problem(path: str | Path) -> str | None:
    """None when ``path`` is a complete FSDP2 sharded checkpoint directory, else what is wrong with it.

    Such a directory holds ``.metadata`` (torch.distributed.checkpoint's index, written last), one
    ``__<rank>_0.distcp`` file per saving rank and Lightning's ``meta.pt`` (global step, loops, callbacks).
    Reads only ``meta.pt``, not the shards.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / ".metadata").is_file():
        return "no .metadata (an interrupted or foreign save)"
    try:
        meta = load_weights_only(path / "meta.pt")
    except Exception as err:  # missing, truncated, ...
        return f"meta.pt unreadable ({type(err).__name__}: {err})"
    if not isinstance(meta, dict) or "global_step" not in meta:
        return "meta.pt is not Lightning checkpoint metadata (no global_step)"
    shards = len(list(path.glob("__*_*.distcp")))
    saved = saved_world_size(meta)
    if saved is not None and shards != saved:
        return f"{shards} shard files for a checkpoint written by {saved} processes"
    return None


def replace_directory(staging: Path, final: Path, token: str) -> None:
    """Put the complete directory ``staging`` at ``final``, replacing what is there. The old one is first
    renamed aside (a hidden temporary name that ``remove_stale_temp_files`` clears), so ``final`` is
    never a half-written mixture; only a kill between the two renames leaves no ``final``, and then
    the run's step checkpoints are the fallback."""
    aside = final.with_name(f".{final.name}.{token}old.tmp")
    if final.is_dir():
        final.rename(aside)
    elif final.exists():
        final.unlink()
    staging.rename(final)
    fsync_directory(final.parent)
    if aside.exists():
        shutil.rmtree(aside)


def _warn_world_size_change(saved: int | None, current: int, path: Any) -> None:
    if saved is not None and saved != current:
        log.warning(
            "resuming %s, written by %d processes, with %d processes: the global batch is now "
            "data.batch_size_per_device x %d and the learning rate is scaled for it",
            path,
            saved,
            current,
            current,
        )


class VitregDDPStrategy(DDPStrategy):
    """DDPStrategy that records the world size in checkpoints and refuses FSDP2 sharded checkpoints clearly."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        checkpoint[_WORLD_SIZE_KEY] = {"strategy": "ddp", "world_size": self.world_size}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if Path(checkpoint_path).is_dir():
            raise ValueError(
                f"{checkpoint_path} is a sharded FSDP2 checkpoint (a directory); resume it with trainer=fsdp"
            )
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=True)  # never unpickles code
        _warn_world_size_change(saved_world_size(checkpoint), self.world_size, checkpoint_path)
        return checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: one data-parallel mesh dimension over every
    process (``data_parallel_size`` = nodes × devices) and ``tensor_parallel_size=1``. The module shards
    itself in ``configure_model`` (``shard_objective``).

    Checkpoints are sharded directories (``torch.distributed.checkpoint``: one file per rank plus
    ``meta.pt``). They record the world size; a resume with another world size loads (DCP reshards the
    parameters and optimiser states) and logs both sizes.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Every rank writes its shards into a hidden staging directory beside the target; once all are
        done, rank 0 swaps it in. A kill mid-write leaves the previous checkpoint whole (DCP writing into
        the old directory would mix old and new shards under the old ``.metadata``)."""
        checkpoint[_WORLD_SIZE_KEY] = {"strategy": "fsdp", "world_size": self.world_size}
        final = Path(self.broadcast(str(filepath)))
        token = self.broadcast(secrets.token_hex(4))
        staging = final.with_name(f".{final.name}.{token}.tmp")
        super().save_checkpoint(checkpoint, staging, storage_options=storage_options)
        self.barrier("vitreg_sharded_checkpoint_written")
        if self.global_rank == 0:
            replace_directory(staging, final, token)
        self.barrier("vitreg_sharded_checkpoint_renamed")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        # ``weights_only`` is ignored on purpose: checkpoints are untrusted input, never unpickled as code.
        path = Path(self.broadcast(checkpoint_path))
        if path.is_file():  # a full checkpoint from trainer=ddp or one process
            checkpoint = self._load_full_checkpoint(path)
        else:  # DCP's reader unpickles .metadata with plain pickle: vet it with the restricted unpickler first
            read_sharded_metadata(path)
            checkpoint = super().load_checkpoint(path, weights_only=True)
        _warn_world_size_change(saved_world_size(checkpoint), self.world_size, path)
        return checkpoint

    def _load_full_checkpoint(self, path: Path) -> dict[str, Any]:
        """Weights and optimiser states of a single-file checkpoint, into the sharded module and optimiser.

        Lightning maps a plain optimiser state (keyed by position) to parameter names in the order of
        ``named_parameters()``, which is not the order of DINOv2's parameter groups; the groups' own
        ``names`` give the right mapping.
        """
        assert self.model is not None and self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        checkpoint = load_weights_only(path, mmap=True)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        fqn = {id(p): name for name, p in self.model.named_parameters()}
        for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states", []), strict=True):
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=_optimizer_state_by_name(state, optimizer, fqn), options=options
            )
        return checkpoint


def _optimizer_state_by_name(state: dict[str, Any], optimizer, fqn: dict[int, str]) -> dict[str, Any]:
    """A positional optimiser state dict (``torch.optim.Optimizer.state_dict()``) keyed by parameter FQN,
    matched through the ``names`` that ``vitreg.ssl.param_groups`` stores in every group."""
    current = {
        name: fqn[id(p)]
        for group in optimizer.param_groups
        for name, p in zip(group["names"], group["params"], strict=True)
    }
    by_position, groups = {}, []
    for group in state["param_groups"]:
        names = [current[name] for name in group["names"]]
        by_position.update(zip(group["params"], names, strict=True))
        groups.append({**group, "params": names})
    return {"state": {by_position[i]: v for i, v in state["state"].items()}, "param_groups": groups}


# ---------------------------------------------------------------------------------------------- FSDP2
def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` or one of its submodules is an FSDP2 (``fully_shard``) module."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _mixed_precision(param_dtype: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])


def shard_objective(objective: nn.Module, mesh, fsdp_cfg: DictConfig) -> None:
    """Apply FSDP2 to a ``DINOv2Objective`` in place (see the module docstring); a no-op if already done.

    Parameter names are unchanged, so ``param_groups`` (layer decay, weight-decay exclusions) and the EMA's
    name matching work on the sharded ``DTensor`` parameters. Build the optimiser afterwards.
    """
    if is_sharded(objective):
        return
    # every rank starts from rank 0's weights, as DDP does when it wraps; FSDP2 would keep each rank's own init
    broadcast_module_(objective, mesh.get_group())
    backbone_mp = _mixed_precision(fsdp_cfg.param_dtype, fsdp_cfg.reduce_dtype)
    head_mp = _mixed_precision(fsdp_cfg.param_dtype, fsdp_cfg.head_reduce_dtype)
    # The teacher has no backward to reshard it: it must reshard after its forward, so that the EMA
    # (and checkpoints) see its sharded parameters.
    for tree, reshard in ((objective.student, bool(fsdp_cfg.reshard_after_forward)), (objective.teacher, True)):
        units = [(block, backbone_mp) for block in tree.backbone.blocks]
        units.append((tree.backbone, backbone_mp))
        units += [(module, head_mp) for name, module in tree.items() if name != "backbone"]
        for module, mp in units:
            fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        set_block_prefetch(
            list(tree.backbone.blocks), int(fsdp_cfg.get("prefetch", 0)), backward=tree is objective.student
        )
        for method in FORWARD_METHODS:
            if hasattr(tree.backbone, method):
                register_fsdp_forward_method(tree.backbone, method)


def set_block_prefetch(blocks: list[nn.Module], depth: int, backward: bool) -> None:
    """All-gather the next ``depth`` blocks while one computes (forward), and the previous ``depth`` in
    backward, instead of FSDP2's implicit one-ahead prefetch that waits for each block's hook. Changes
    when parameters arrive, never the numbers. ``depth`` 0 keeps FSDP2's default."""
    if depth <= 0:
        return
    for i, block in enumerate(blocks):
        ahead = blocks[i + 1 : i + 1 + depth]
        if ahead:
            block.set_modules_to_forward_prefetch(ahead)
        behind = blocks[max(0, i - depth) : i][::-1]  # backward runs the blocks in reverse
        if backward and behind:
            block.set_modules_to_backward_prefetch(behind)


def unsharded_copy(backbone: nn.Module, device: torch.device | str) -> nn.Module | None:
    """A plain (unsharded, fp32) copy of an FSDP2-sharded ``VisionTransformer`` on rank 0, None elsewhere.

    A collective: every rank must call it. For code that expects ordinary fp32 modules and runs on rank 0
    only (telemetry: its hooks read parameters outside forwards and compute in fp32), at the cost of one
    temporary fp32 replica on rank 0.
    """
    state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank_and_world()[0] != 0:
        return None
    plain = next(c for c in type(backbone).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclasses
    with torch.device("meta"):
        copy = plain(backbone.cfg)
    copy.load_state_dict(state, assign=True)
    return copy.to(device).train(backbone.training)

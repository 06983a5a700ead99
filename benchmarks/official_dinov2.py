"""The official DINOv2 training step (``SSLMetaArch``), built to match a vitreg config, for benchmarks.

Needs a checkout of facebookresearch/dinov2 (not a dependency of vitreg; nothing of it is copied here).
Current torch, and a machine without CUDA or xformers, need small run-time patches; every patch applied
is appended to a list the caller prints:

- ``dinov2.train`` is imported without its ``__init__`` (which pulls in the data stack and fvcore);
  a stand-in ``fvcore`` module is registered when fvcore is missing (only its ``Checkpointer`` base
  class is referenced by ``dinov2.fsdp``, and never used by the step).
- dinov2 issue #265: ``free_if_fsdp`` reads FSDP1's ``_handles``, which torch >= 2.1 replaced by ``_handle``.
- dinov2 issues #310/#391: FSDP1 has no ``_streams`` any more; ``need_to_synchronize_fsdp_streams`` is off.
- Without xformers: a pure-PyTorch stand-in for the few xformers ops the training path calls (block-diagonal
  attention over the packed crops, ``index_select_cat``, ``scaled_index_add``); slower than xformers, so
  official timings taken with it are a lower bound.
- Without CUDA: ``forward_backward`` calls ``.cuda()`` on the batch (made a no-op for CPU tensors), and the
  model runs unwrapped (FSDP1 needs CUDA), so the EMA and gradient clipping use plain-module equivalents.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vitreg.config import to_dataclass
from vitreg.models.config import ModelConfig

# vitreg sizes that DINOv2 ships as named architectures (same embed_dim, depth, heads).
OFFICIAL_ARCH = {(384, 12, 6): "vit_small", (768, 12, 12): "vit_base", (1024, 24, 16): "vit_large"}
OFFICIAL_ARCH[(1536, 40, 24)] = "vit_giant2"
EXTRA_ARCH = "vit_vitreg_shape"  # registered at run time for the other sizes (vitt)


# ------------------------------------------------------------------ xformers stand-in
class BlockDiagonalMask:
    """The part of ``xformers.ops.fmha.BlockDiagonalMask`` DINOv2's training path uses: sequences of
    ``seqlens[i]`` tokens packed along dim 1, attended to independently."""

    def __init__(self, seqlens: list[int]) -> None:
        self.seqlens = list(seqlens)
        self._batch_sizes: list[int] | None = None

    @classmethod
    def from_seqlens(cls, seqlens: list[int]) -> BlockDiagonalMask:
        return cls(seqlens)

    @classmethod
    def from_tensor_list(cls, tensors: list[Tensor]) -> tuple[BlockDiagonalMask, Tensor]:
        mask = cls([t.shape[1] for t in tensors for _ in range(t.shape[0])])
        mask._batch_sizes = [t.shape[0] for t in tensors]
        return mask, torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in tensors], dim=1)

    def groups(self) -> Iterator[tuple[int, int]]:
        """(sequences, tokens per sequence) for each run of equal lengths, in packing order."""
        start = 0
        while start < len(self.seqlens):
            end = start
            while end < len(self.seqlens) and self.seqlens[end] == self.seqlens[start]:
                end += 1
            yield end - start, self.seqlens[start]
            start = end

    def split(self, packed: Tensor) -> list[Tensor]:
        sizes = self._batch_sizes or [count for count, _ in self.groups()]
        out, offset, seq = [], 0, 0
        for batch in sizes:
            length = self.seqlens[seq]
            out.append(packed[:, offset : offset + batch * length].reshape(batch, length, *packed.shape[2:]))
            offset, seq = offset + batch * length, seq + batch
        return out


def memory_efficient_attention(q: Tensor, k: Tensor, v: Tensor, attn_bias: BlockDiagonalMask | None = None) -> Tensor:
    """xformers layout ``(B, N, heads, head_dim)``; with a block-diagonal bias, ``B == 1`` and every
    run of equal-length sequences is attended to as one SDPA batch."""

    def sdpa(q_: Tensor, k_: Tensor, v_: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(
            1, 2
        )

    if attn_bias is None:
        return sdpa(q, k, v)
    outs, offset = [], 0
    for count, length in attn_bias.groups():
        rows = slice(offset, offset + count * length)
        parts = [t[:, rows].reshape(count, length, *t.shape[2:]) for t in (q, k, v)]
        outs.append(sdpa(*parts).reshape(1, count * length, *q.shape[2:]))
        offset += count * length
    return torch.cat(outs, dim=1)


def index_select_cat(sources: list[Tensor], indices: list[Tensor]) -> Tensor:
    return torch.cat([source[index].flatten() for source, index in zip(sources, indices, strict=True)])


def scaled_index_add(
    x: Tensor, index: Tensor, source: Tensor, scaling: Tensor | None = None, alpha: float = 1.0
) -> Tensor:
    return torch.index_add(x, 0, index, source * scaling if scaling is not None else source, alpha=alpha)


def install_xformers_stand_in() -> None:
    """Register ``xformers`` / ``xformers.ops`` modules holding the stand-ins. SwiGLU and cross_entropy
    are left out on purpose: DINOv2 then uses its own pure-PyTorch fallbacks for them."""
    ops = types.ModuleType("xformers.ops")
    ops.fmha = types.ModuleType("xformers.ops.fmha")
    ops.fmha.BlockDiagonalMask = BlockDiagonalMask
    ops.memory_efficient_attention = memory_efficient_attention
    ops.unbind = torch.unbind
    ops.index_select_cat = index_select_cat
    ops.scaled_index_add = scaled_index_add
    package = types.ModuleType("xformers")
    package.ops = ops
    sys.modules.update({"xformers": package, "xformers.ops": ops, "xformers.ops.fmha": ops.fmha})


def xformers_importable() -> bool:
    try:
        from xformers.ops import fmha, memory_efficient_attention  # noqa: F401
    except Exception:  # a broken build is as good as none here
        return False
    return True


# ------------------------------------------------------------------ import
def stub_fvcore_if_missing(patches: list[str]) -> None:
    if importlib.util.find_spec("fvcore") is not None:
        return
    checkpoint = types.ModuleType("fvcore.common.checkpoint")
    checkpoint.Checkpointer = type("Checkpointer", (), {})
    for name, module in (
        ("fvcore", types.ModuleType("fvcore")),
        ("fvcore.common", types.ModuleType("fvcore.common")),
        ("fvcore.common.checkpoint", checkpoint),
    ):
        sys.modules.setdefault(name, module)
    patches.append("fvcore stand-in (only its Checkpointer base class is referenced)")


def patch_free_if_fsdp(dinov2_fsdp: types.ModuleType, patches: list[str]) -> None:
    """dinov2 #265: reshard through FSDP1's single ``_handle``."""
    from torch.distributed.fsdp._runtime_utils import _reshard

    def free_if_fsdp(module) -> None:
        if dinov2_fsdp.is_sharded_fsdp(module) and getattr(module, "_handle", None) is not None:
            _reshard(module, module._handle, True)

    dinov2_fsdp.free_if_fsdp = free_if_fsdp
    patches.append("#265 free_if_fsdp via FSDP1 _handle")


def import_official(repo: Path, patches: list[str]) -> types.ModuleType:
    """``dinov2.train.ssl_meta_arch`` from the checkout at ``repo``, patched for current torch."""
    if not (repo / "dinov2" / "train" / "ssl_meta_arch.py").exists():
        raise FileNotFoundError(f"--dinov2-repo {repo}: no dinov2/train/ssl_meta_arch.py there")
    sys.path.insert(0, str(repo))
    if not xformers_importable():
        install_xformers_stand_in()
        patches.append("xformers stand-in (pure PyTorch block-diagonal attention: official timings are a lower bound)")
    stub_fvcore_if_missing(patches)
    # a bare package object: its __init__ would import train.py and the whole data stack
    train_package = types.ModuleType("dinov2.train")
    train_package.__path__ = [str(repo / "dinov2" / "train")]
    sys.modules["dinov2.train"] = train_package
    patches.append("dinov2.train imported without its __init__")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "xFormers is not available" and FSDP1 deprecation notices
        dinov2_fsdp = importlib.import_module("dinov2.fsdp")
        patch_free_if_fsdp(dinov2_fsdp, patches)
        return importlib.import_module("dinov2.train.ssl_meta_arch")


# ------------------------------------------------------------------ config
def official_arch(vcfg: DictConfig, patches: list[str]) -> str:
    """The official architecture name with vitreg's backbone shape (registered when DINOv2 has none)."""
    vit = to_dataclass(ModelConfig, vcfg.model).vit_config(vcfg.augment.global_crops_size)
    key = (vit.embed_dim, vit.depth, vit.num_heads)
    if key in OFFICIAL_ARCH:
        return OFFICIAL_ARCH[key]
    vits = importlib.import_module("dinov2.models.vision_transformer")
    block = partial(vits.Block, attn_class=importlib.import_module("dinov2.layers").MemEffAttention)
    setattr(
        vits,
        EXTRA_ARCH,
        partial(vits.DinoVisionTransformer, embed_dim=vit.embed_dim, depth=vit.depth, num_heads=vit.num_heads,
                mlp_ratio=vit.mlp_ratio, block_fn=block),
    )  # fmt: skip
    patches.append(f"arch {EXTRA_ARCH} registered (embed {vit.embed_dim}, depth {vit.depth}, heads {vit.num_heads})")
    return EXTRA_ARCH


def head_overrides(head: DictConfig) -> dict:
    keys = ("loss_weight", "head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")
    return {k: head[k] for k in keys}


def official_config(repo: Path, vcfg: DictConfig, batch: int, param_dtype: str, patches: list[str]) -> DictConfig:
    """DINOv2's ``vitl14`` recipe with vitreg's shapes, crops, heads and batch; FSDP1 mixed precision
    computes in ``param_dtype`` (no grad scaler: bf16 needs none)."""
    configs = repo / "dinov2" / "configs"
    base = OmegaConf.merge(
        OmegaConf.load(configs / "ssl_default_config.yaml"), OmegaConf.load(configs / "train" / "vitl14.yaml")
    )
    vit = to_dataclass(ModelConfig, vcfg.model).vit_config(vcfg.augment.global_crops_size)
    a, ssl = vcfg.augment, vcfg.ssl
    ibot = {**head_overrides(ssl.ibot), "separate_head": ssl.ibot.separate_head}
    overrides = {
        "train": {"batch_size_per_gpu": batch, "centering": ssl.centering},
        "student": {
            "arch": official_arch(vcfg, patches),
            "patch_size": vit.patch_size,
            "drop_path_rate": vit.drop_path_rate,
            "drop_path_uniform": vit.drop_path_uniform,
            "layerscale": vit.layerscale_init,
            "ffn_layer": "swiglufused" if vit.ffn_layer == "swiglu" else vit.ffn_layer,
            "num_register_tokens": vit.num_register_tokens,
            "interpolate_antialias": bool(vit.interpolate_antialias),
            "interpolate_offset": float(vit.interpolate_offset),
        },
        "crops": {
            "global_crops_size": a.global_crops_size,
            "local_crops_size": a.local_crops_size,
            "local_crops_number": a.local_crops_number,
        },
        "dino": {**head_overrides(ssl.dino), "koleo_loss_weight": ssl.dino.koleo_loss_weight},
        "ibot": ibot,
        "compute_precision": {"grad_scaler": False},
    }
    cfg = OmegaConf.merge(base, OmegaConf.create(overrides))
    for who in ("student", "teacher"):
        for part, settings in cfg.compute_precision[who].items():
            settings.mixed_precision.param_dtype = param_dtype
            if who == "teacher" or part == "backbone":  # the student's heads reduce in fp32, as released
                settings.mixed_precision.reduce_dtype = param_dtype
    return cfg


# ------------------------------------------------------------------ step
@contextlib.contextmanager
def cuda_calls_keep_cpu_tensors() -> Iterator[None]:
    """``forward_backward`` moves the batch with ``.cuda()``; on a CPU-only machine that is a no-op."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def official_batch(batch: dict) -> dict:
    """vitreg's collated batch under the official key names (fresh tensors: the official SK reduces
    ``n_masked_patches`` in place)."""
    return {
        "collated_global_crops": batch["global_crops"],
        "collated_local_crops": batch["local_crops"],
        "collated_masks": batch["masks"],
        "mask_indices_list": batch["mask_indices"],
        "masks_weight": batch["masks_weight"],
        "n_masked_patches": batch["n_masked_patches"].clone(),
        "upperbound": batch["upperbound"],
    }


def plain_ema_(model, momentum: float) -> None:
    """``update_teacher`` without FSDP: the same two foreach ops over the unwrapped parameters."""
    with torch.no_grad():
        teacher = [p for k in model.student for p in model.teacher[k].parameters()]
        student = [p for k in model.student for p in model.student[k].parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)


def build_official(repo: Path, vcfg: DictConfig, batch: int, device: torch.device, patches: list[str]):
    """The official ``SSLMetaArch`` (FSDP1-wrapped in bf16 on CUDA, plain fp32 on CPU) and its AdamW."""
    meta_arch = import_official(repo, patches)
    on_cuda = device.type == "cuda"
    cfg = official_config(repo, vcfg, batch, "bf16" if on_cuda else "fp32", patches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(device):
            model = meta_arch.SSLMetaArch(cfg)
        if on_cuda:
            importlib.import_module("dinov2.distributed")._LOCAL_RANK = 0  # FSDP1's device_id
            model.prepare_for_distributed_training()  # FSDP1, as train.py
            patches.append("FSDP1 (SHARD_GRAD_OP, bf16 params) on a 1-rank process group")
    model.need_to_synchronize_fsdp_streams = False
    patches.append("#310/#391 need_to_synchronize_fsdp_streams=False")
    if not on_cuda:
        patches.append("CPU: .cuda() on the batch is a no-op, no FSDP (fp32), EMA and clipping on plain modules")
    model.train()
    optimizer = torch.optim.AdamW(model.get_params_groups(), betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    return model, optimizer, cfg


def official_step(model, optimizer, cfg: DictConfig, device: torch.device, schedules) -> Callable[[dict, int], None]:
    """One iteration of DINOv2's ``do_train`` loop (bf16 without a scaler): schedules, forward_backward,
    per-module clip, AdamW, EMA, and the per-step read of the losses (its NaN check)."""
    on_cuda = device.type == "cuda"
    moves = contextlib.nullcontext if on_cuda else cuda_calls_keep_cpu_tensors
    clip = cfg.optim.clip_grad

    def step(batch: dict, it: int) -> None:
        lr, wd, last_layer_lr = schedules.lr(it), schedules.wd(it), schedules.last_layer_lr(it)
        for group in optimizer.param_groups:
            group["weight_decay"] = wd * group["wd_multiplier"]
            group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        optimizer.zero_grad(set_to_none=True)
        with moves():
            losses = model.forward_backward(official_batch(batch), teacher_temp=schedules.teacher_temp(it))
        for module in model.student.values():
            if on_cuda:
                module.clip_grad_norm_(clip)  # FSDP1's own
            else:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        if on_cuda:
            model.update_teacher(schedules.momentum(it))
        else:
            plain_ema_(model, schedules.momentum(it))
        if math.isnan(sum(v.item() for v in losses.values())):
            raise FloatingPointError(f"official step {it}: NaN loss")

    return step


def student_parameter_count(model) -> int:
    return sum(p.numel() for p in model.student.parameters())

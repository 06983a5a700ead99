"""FLOPs of one training step (student and teacher, forward and backward), counted once on fake tensors.

``perf/mfu`` and ``benchmarks/bench_step.py`` divide these by time and the device's peak. The model is built
on the meta device and given fake CPU storage, so counting a ViT-L step needs no memory and no compute;
the iBOT masks are real draws of the collator, so the head rows are what training runs (with
``ssl.ibot.pad_masked_tokens`` always the batch's upperbound). Drop path's batch subsets are counted as
computed: with ``model.drop_path_rate`` 0.4 a step costs about two thirds of the nominal FLOPs.
"""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig, OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from vitreg.data.collate import mask_fields
from vitreg.lit.data import multicrop_collator
from vitreg.lit.module import build_objective


def cpu_flash_attention_formulas() -> dict:
    """torch's FLOP counter knows the CUDA SDPA kernels but not the CPU flash kernel; same formulas."""
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)
        ),
    }


def representative_batch(cfg: DictConfig, batch_size: int, seed: int = 0, device: str | torch.device = "meta") -> dict:
    """A training batch of ``batch_size`` images: crops without content (on the meta device by default: no
    memory) and iBOT masks drawn by the run's collator."""
    a = cfg.augment
    masks, upperbound = multicrop_collator(cfg).make_masks(2 * batch_size, random.Random(seed))
    local = a.local_crops_number * batch_size
    return {
        "global_crops": torch.empty(2 * batch_size, 3, a.global_crops_size, a.global_crops_size, device=device),
        "local_crops": torch.empty(local, 3, a.local_crops_size, a.local_crops_size, device=device) if local else None,
        **mask_fields(masks, upperbound),
        "labels": torch.zeros(batch_size, dtype=torch.long),
    }


def step_flops(cfg: DictConfig, batch: dict | None = None, seed: int = 0) -> int:
    """FLOPs of one training step of ``cfg``'s objective on ``batch`` (default: a batch of
    ``data.batch_size_per_device`` images with masks drawn from ``seed``)."""
    # shapes only: never read a file; SDPA whatever the run's kernel (the same FLOPs; xformers has no CPU kernel)
    cfg = OmegaConf.merge(cfg, {"model": {"pretrained_weights": None, "attn_backend": "sdpa"}})
    batch = representative_batch(cfg, cfg.data.batch_size_per_device, seed) if batch is None else batch
    with torch.device("meta"):
        objective = build_objective(cfg)
    # the objective's autocast(device_type=x.device.type) rejects the bare meta device: fake CPU storage
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        objective = objective.to_empty(device="cpu").train()
        batch = {k: _fake_cpu(fake, v) if torch.is_tensor(v) else v for k, v in batch.items()}
        with FlopCounterMode(display=False, custom_mapping=cpu_flash_attention_formulas()) as counter:
            objective(batch, teacher_temp=cfg.ssl.teacher.teacher_temp)["loss"].backward()
    return counter.get_total_flops()


def _fake_cpu(fake, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_meta:  # no content to copy: a fake CPU tensor of the same shape
        with fake:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
    return fake.from_tensor(tensor.cpu())


def flops_per_image(cfg: DictConfig) -> float:
    """FLOPs of one image's share of a training step (what ``perf/mfu`` multiplies by images/s)."""
    return step_flops(cfg) / cfg.data.batch_size_per_device

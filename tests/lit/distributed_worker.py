"""Worker for tests/lit/test_distributed.py: runs training scenarios in real processes (torchrun, gloo).

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=N -m tests.lit.distributed_worker
<batches.pt> <out_dir> <scenario> ...`` from the repository root. Each scenario writes
``<out_dir>/<scenario>.rank<r>.pt``: the rank's per-step losses and gradient norms, and on rank 0 the
full (gathered) student/teacher weights. The helpers are shared with the test, which runs the one-process
reference itself.

Exact comparisons need the same global batch everywhere: the batches are made once with the real
multi-crop collator (``make_global_batches``), the one-process run takes whole batches and rank r of N
takes slice r (``rank_slice``). ``ReplayModule`` picks the batch by ``global_step``, so a resumed run
continues with the right batch whatever Lightning's loader does.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from tests.conftest import TINY, compose_config
from vitreg.lit.module import DINOv2Module
from vitreg.lit.strategies import build_strategy, is_sharded, sharded_checkpoint_problem

STEPS = 3
# runs that must equal the one-process run with the global batch (koleo off, no stochastic depth)
EQUALITY = [
    "ddp_centering",
    "ddp_sinkhorn_knopp",
    "fsdp_centering",
    "fsdp_sinkhorn_knopp",
    "fsdp_reshard_centering",
    "fsdp_prefetch_centering",  # explicit two-block prefetch changes when parameters arrive, not the numbers
]
PER_RANK = 2  # images per process; the one-process reference takes WORLD * PER_RANK
WORLD = 2


def scenario_overrides(centering: str = "centering", koleo: float = 0.0) -> list[str]:
    """TINY, deterministic (no stochastic depth), with fast-moving student and teacher so every
    mechanism (layer decay, weight decay, clipping, EMA) leaves a visible trace in 3 steps."""
    return [
        *TINY,
        f"ssl.centering={centering}",
        f"ssl.dino.koleo_loss_weight={koleo}",
        "model.drop_path_rate=0",
        "optim.base_lr=0.05",
        "optim.layerwise_decay=0.9",
        "optim.clip_grad=1.0",
        "ssl.teacher.momentum_teacher=0.6",
        "ssl.teacher.final_momentum_teacher=0.7",
        "callbacks.telemetry.enabled=false",
        "logger.kind=none",
        "trainer.fsdp.param_dtype=float32",  # bf16 matmuls are slow on CPU, and exact comparisons need fp32
    ]


def scenario_centering(name: str) -> str:
    return "sinkhorn_knopp" if name.endswith("sinkhorn_knopp") else "centering"


def config(strategy: str, devices: int, per_device: int, **kwargs) -> DictConfig:
    group = {"ddp": ["trainer=ddp"], "fsdp": ["trainer=fsdp"]}.get(strategy, [])
    cfg = compose_config([*scenario_overrides(**kwargs), *group, f"data.batch_size_per_device={per_device}"])
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = devices
    return cfg


# ------------------------------------------------------------------------------------------ batches
def _mask_fields(batch: dict) -> dict:
    masks = batch["masks"]
    per_image = masks.sum(-1, keepdim=True).clamp(min=1).float()
    batch["mask_indices"] = masks.flatten().nonzero().flatten()
    batch["masks_weight"] = (1.0 / per_image).expand_as(masks)[masks]
    batch["n_masked_patches"] = torch.full((1,), int(masks.sum()), dtype=torch.long)
    return batch


def _rows(t: torch.Tensor, n_views: int, images: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of every view of a crop-major tensor (view 0 of all images, then view 1...)."""
    return torch.cat([t[v * images + start : v * images + stop] for v in range(n_views)])


def rank_slice(batch: dict, rank: int, world: int) -> dict:
    """The part of a collated global batch that rank ``rank`` of ``world`` trains on: images
    ``[rank·b, (rank+1)·b)`` of every crop, with the mask bookkeeping recomputed for them."""
    images = batch["labels"].shape[0]
    b = images // world
    lo, hi = rank * b, (rank + 1) * b
    out = {
        "global_crops": _rows(batch["global_crops"], 2, images, lo, hi),
        "masks": _rows(batch["masks"], 2, images, lo, hi),
        "labels": batch["labels"][lo:hi],
        "upperbound": batch["upperbound"],
        "local_crops": None,
    }
    if batch["local_crops"] is not None:
        n_local = batch["local_crops"].shape[0] // images
        out["local_crops"] = _rows(batch["local_crops"], n_local, images, lo, hi)
    return _mask_fields(out)


def make_global_batches(cfg: DictConfig, steps: int, images: int, world: int) -> list[dict]:
    """``steps`` batches of ``images`` images through the real multi-crop transform and collator.

    Every rank's slice gets the same iBOT mask layout: iBOT centering averages the per-rank means of the
    masked teacher tokens (as DINOv2 does), which equals the global mean only when every rank holds the
    same number of masked tokens. (Sinkhorn-Knopp uses the all-reduced count and needs no such care.)
    """
    from vitreg.data.synthetic import SyntheticShapes
    from vitreg.lit.data import multicrop_collator, multicrop_transform

    torch.manual_seed(cfg.seed)
    syn = cfg.data.synthetic
    data = SyntheticShapes(images * steps, syn.image_size, syn.num_classes, cfg.seed, "train", multicrop_transform(cfg))
    collate = multicrop_collator(cfg)
    batches = []
    for s in range(steps):
        batch = collate([data[s * images + i] for i in range(images)])
        masks = batch["masks"].view(2, world, images // world, -1)
        richest = int(masks.sum(dim=(0, 2, 3)).argmax())
        masks[:] = masks[:, richest : richest + 1].clone()  # one rank's layout on every rank (see above)
        batches.append(_mask_fields(batch))
    assert all(int(b["masks"].sum()) > 0 for b in batches), "every step must exercise iBOT"
    return batches


# ------------------------------------------------------------------------------------------ training
class ReplayModule(DINOv2Module):
    """Trains on precomputed batches (the one for ``global_step``) and records losses and the gradient
    norm of each student sub-module before clipping (the value ``clip_grad_norm_`` returns)."""

    def __init__(self, cfg: DictConfig, batches: list[dict], world_size: int = 1) -> None:
        super().__init__(cfg, world_size=world_size)
        self.replay = batches
        self.losses: list[float] = []
        self.grad_norms: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx: int):
        out = super().training_step(self.replay[self.global_step], batch_idx)
        self.losses.append(float("nan") if out is None else float(out["loss"].detach()))
        return out

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        norms = {}
        for name, sub in self.student.items():
            norm = torch.nn.utils.get_total_norm([p.grad for p in sub.parameters() if p.grad is not None])
            norms[name] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.grad_norms.append(norms)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def trainer(cfg: DictConfig, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=cfg.trainer.devices,
        strategy=build_strategy(cfg),
        precision="32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=cfg.optim.clip_grad,
        use_distributed_sampler=False,
        **kwargs,
    )


def step_loader() -> DataLoader:
    return DataLoader(list(range(1000)), batch_size=None)  # placeholders: ReplayModule picks the batch


def fit(cfg: DictConfig, batches: list[dict], steps: int = STEPS, ckpt_path: str | None = None, **kwargs):
    torch.manual_seed(cfg.seed)  # every process builds the same initial weights
    tr = trainer(cfg, steps, **kwargs)
    module = ReplayModule(cfg, batches, world_size=tr.world_size)
    tr.fit(module, train_dataloaders=step_loader(), ckpt_path=ckpt_path)
    return tr, module


def full_state(module: DINOv2Module) -> dict[str, torch.Tensor]:
    """Student, teacher and centers as full tensors (on rank 0 when sharded; a collective then)."""
    if is_sharded(module.objective):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module.objective, options=options)
    return {k: v.detach().cpu().clone() for k, v in module.objective.state_dict().items()}


def sharding_report(module: DINOv2Module) -> dict:
    """Teacher and student shards must line up parameter by parameter for the local EMA."""
    from torch.distributed.tensor import DTensor

    student = dict(module.student.named_parameters())
    teacher = dict(module.teacher.named_parameters())
    dtensors = mismatched = 0
    for name, s in student.items():
        t = teacher[name]
        if isinstance(s, DTensor) and isinstance(t, DTensor):
            dtensors += 1
            if s.placements != t.placements or s.to_local().shape != t.to_local().shape:
                mismatched += 1
    return {"params": len(student), "dtensors": dtensors, "mismatched": mismatched}


# ------------------------------------------------------------------------------------------ scenarios
def _record(module: ReplayModule, **extra) -> dict:
    return {"losses": module.losses, "grad_norms": module.grad_norms, "state": full_state(module), **extra}


def run_scenario(name: str, batches: list[dict], out: Path, world: int) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    mine = [rank_slice(b, rank, world) for b in batches]
    if name in EQUALITY:
        strategy, centering = name.split("_")[0], scenario_centering(name)
        cfg = config(strategy, world, PER_RANK, centering=centering)
        with open_dict(cfg):
            cfg.trainer.fsdp.reshard_after_forward = "_reshard_" in name  # FULL_SHARD for the student too
            cfg.trainer.fsdp.prefetch = 2 if "_prefetch_" in name else 0
        _, module = fit(cfg, mine)
        extra = {"sharding": sharding_report(module)} if strategy == "fsdp" else {}
        return _record(module, **extra)
    if name == "fsdp_bf16":  # the default precision: bf16 compute on all-gathered params, fp32 master weights
        cfg = config("fsdp", world, PER_RANK)
        with open_dict(cfg):
            cfg.trainer.fsdp.param_dtype = "bfloat16"
        _, module = fit(cfg, mine)
        dtypes = {str(p.to_local().dtype) for p in module.objective.parameters()}
        return {"losses": module.losses, "master_dtypes": sorted(dtypes)}
    if name == "ddp_bf16_hook":  # gradients all-reduced in bf16
        cfg = config("ddp", world, PER_RANK)
        with open_dict(cfg):
            cfg.trainer.ddp.comm_hook = "bf16"
        _, module = fit(cfg, mine)
        return {"losses": module.losses}
    if name == "ddp_koleo":
        _, module = fit(config("ddp", world, PER_RANK, koleo=0.1), mine)
        return _record(module)
    if name == "fsdp_resume":  # 2 steps, sharded checkpoint, a fresh module resumes it for the 3rd step
        ckpt = out / "fsdp_step2.ckpt"
        tr, _ = fit(config("fsdp", world, PER_RANK), mine, steps=2)
        tr.save_checkpoint(ckpt)
        tr, module = fit(config("fsdp", world, PER_RANK), mine, ckpt_path=str(ckpt))
        return _record(module, resumed_step=tr.global_step, ckpt_files=sorted(p.name for p in ckpt.iterdir()))
    if name == "ddp_to_fsdp":  # a full DDP checkpoint file, resumed by FSDP2 (weights and AdamW states resharded)
        ckpt = out / "ddp_step2.ckpt"
        tr, _ = fit(config("ddp", world, PER_RANK), mine, steps=2)
        tr.save_checkpoint(ckpt)
        tr, module = fit(config("fsdp", world, PER_RANK), mine, ckpt_path=str(ckpt))
        return _record(module, resumed_step=tr.global_step)
    if name == "fsdp_resume_world1":  # the 2-process checkpoint, resumed by one process (same global batch)
        tr, module = fit(config("fsdp", 1, PER_RANK * WORLD), batches, ckpt_path=str(out / "fsdp_step2.ckpt"))
        return _record(module, resumed_step=tr.global_step)
    if name == "pretrain_fsdp":
        return pretrain_fsdp(out, world)
    if name == "pretrain_ddp":
        return pretrain_ddp(out, world)
    if name == "pretrain_fsdp_world1":
        return pretrain_fsdp_other_world(out)
    raise ValueError(f"unknown scenario {name}")


def _pretrain_cfg(run_dir: Path, devices: int, steps: int, ckpt_path: str | None = None) -> DictConfig:
    """The production path (``pretrain``): synthetic shards, online kNN and linear probes, telemetry every 2 steps."""
    cfg = compose_config(
        [
            *TINY,
            "trainer=fsdp",  # with its default bf16 compute
            "data.batch_size_per_device=2",
            "callbacks.online_knn.enabled=true",
            "callbacks.online_linear.enabled=true",
            "callbacks.online_linear.every_n_steps=1",
            "callbacks.telemetry.every_n_steps=2",
            "callbacks.checkpoint_every_n_steps=2",
            "logger.kind=csv",
            f"trainer.max_steps={steps}",
        ],
        run_dir=run_dir,
    )
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = devices
        cfg.ckpt_path = ckpt_path
    return cfg


def pretrain_fsdp(out: Path, world: int) -> dict:
    from vitreg.lit.pretrain import pretrain

    run_dir = out / "pretrain_fsdp"
    first = pretrain(_pretrain_cfg(run_dir, world, 2))
    last = run_dir / "checkpoints" / "last.ckpt"
    files = sorted(p.name for p in last.iterdir()) if last.is_dir() else None
    # Explicit ckpt_path: the newest-checkpoint search of pretrain() is exercised by the checkpointing tests.
    second, resume_error = None, None
    try:
        second = pretrain(_pretrain_cfg(run_dir, world, 3, ckpt_path=str(last)))
    except Exception as err:  # reported by the test
        resume_error = f"{type(err).__name__}: {err}"
    records = []
    if dist.get_rank() == 0:
        from vitreg.telemetry.store import read_records

        records = read_records(run_dir / "telemetry")
    return {
        "first": first,
        "second": second,
        "resume_error": resume_error,
        "last_files": files,
        "last_problem": sharded_checkpoint_problem(last),
        "telemetry_records": records,
    }


def pretrain_ddp(out: Path, world: int) -> dict:
    """trainer=ddp through pretrain(): telemetry stays on rank 0 (no collective in it), kNN everywhere."""
    from vitreg.lit.pretrain import pretrain

    run_dir = out / "pretrain_ddp"
    cfg = _pretrain_cfg(run_dir, world, 2)
    with open_dict(cfg):
        cfg.trainer.strategy = "ddp"
    summary = pretrain(cfg)
    records = []
    if dist.get_rank() == 0:
        from vitreg.telemetry.store import read_records

        records = read_records(run_dir / "telemetry")
    return {
        "summary": summary,
        "telemetry_records": records,
        "last_is_file": (run_dir / "checkpoints/last.ckpt").is_file(),
    }


def pretrain_fsdp_other_world(out: Path) -> dict:
    from vitreg.lit.pretrain import pretrain

    last = out / "pretrain_fsdp" / "checkpoints" / "last.ckpt"
    try:
        pretrain(_pretrain_cfg(out / "pretrain_fsdp_world1", 1, 4, ckpt_path=str(last)))
    except Exception as err:  # the expected outcome: a clear refusal
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def main(argv: list[str]) -> int:
    batches_path, out, *scenarios = argv
    out = Path(out)
    batches = torch.load(batches_path, weights_only=False)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    failed = False
    for name in scenarios:
        start = time.perf_counter()
        try:
            result = run_scenario(name, batches, out, world)
            result["seconds"] = time.perf_counter() - start
        except Exception:
            failed = True
            result = {"exception": traceback.format_exc()}
            print(f"[rank {rank}] scenario {name} failed:\n{result['exception']}", file=sys.stderr, flush=True)
        torch.save(result, out / f"{name}.rank{rank}.pt")
        if failed:
            break
    (out / f"done.rank{rank}.json").write_text(json.dumps({"failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Training-step speed: vitreg's full step (forward, backward, per-module clip, AdamW, EMA) in steady
state, for several variants, and optionally the official DINOv2 ``SSLMetaArch`` step on the same
device, weight shapes and batch.

    python benchmarks/bench_step.py --tiny --device cpu --threads 1           # ~45 s on 2 shared CPU cores
    python benchmarks/bench_step.py --tiny --device cpu --dinov2-repo /tmp/dinov2
    python benchmarks/bench_step.py --device cuda --batch 32 --dinov2-repo /path/to/dinov2
    python benchmarks/bench_step.py --variants loop-eager-bf16-fused official --dinov2-repo /path/to/dinov2 \
        -- ssl.dino.head_n_prototypes=65536

Default model: DINOv2's ViT-L/14 + 4 registers recipe (``experiment=dinov2_vitl14_reg4``); ``--tiny``
shrinks it (vitt, 56/28 px crops, 256-prototype heads); Hydra overrides after ``--`` apply last.

Variants are named ``RUNNER-COMPILE-PRECISION-ADAMW``:
  RUNNER     loop: DINOv2Objective + AdamW in a plain loop, as DINOv2's train.py (schedules, forward,
             backward, per-module clip, AdamW, EMA, one read of the loss for the NaN check);
             lightning: DINOv2Module driven by an L.Trainer (no callbacks, no logger)
  COMPILE    eager | compiled (``trainer.compile=true``: reported unavailable until DINOv2Module applies it)
  PRECISION  fp32 | bf16 (autocast; on the Trainer, ``bf16-mixed``)
  ADAMW      foreach | fused (``optim.fused``; fused where torch supports it on the device)
and ``official`` (needs ``--dinov2-repo``; bf16 FSDP1 on CUDA, fp32 unwrapped on CPU).

Each prints img/s, step time (median, min-max), peak memory (CUDA: max_memory_allocated; CPU: peak RSS
during the timed steps) and, on CUDA, MFU against the device's dense bf16 peak. FLOPs are counted once
with torch.utils.flop_counter on fake (meta-backed) tensors: "actual" with the config's batch-subset
drop path, "nominal" with drop path off. Batches are already on the device: host-to-device copies
and the data pipeline are not timed. The last line is ``vitreg/official img/s ratio R`` (the best
vitreg variant over the official step) or, without ``--dinov2-repo``, ``vitreg img/s X`` (the best
vitreg variant).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import official_dinov2
import torch
import torch.distributed as dist
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from vitreg.config import register_configs, to_dataclass
from vitreg.data.collate import mask_fields
from vitreg.lit.data import multicrop_collator
from vitreg.lit.flops import step_flops  # the counter perf/mfu uses in training
from vitreg.lit.module import DINOv2Module, build_objective
from vitreg.lit.perf import peak_flops
from vitreg.models.config import ModelConfig
from vitreg.ssl.param_groups import apply_schedules, param_groups

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "experiment=dinov2_vitl14_reg4"
TINY = [
    "model.arch=vitt",
    "augment.global_crops_size=56",
    "augment.local_crops_size=28",
    *(f"ssl.{head}.{key}={value}" for head in ("dino", "ibot")
      for key, value in (("head_n_prototypes", 256), ("head_hidden_dim", 128), ("head_bottleneck_dim", 64))),
]  # fmt: skip
# Dense bf16 peak FLOP/s by device name (first match wins: PCIe before the SXM default).
RUNNERS, PRECISIONS, ADAMWS = ("loop", "lightning"), ("fp32", "bf16"), ("foreach", "fused")
OFFICIAL = "official"


@dataclass(frozen=True)
class Variant:
    runner: str
    compiled: bool
    precision: str
    adamw: str

    @property
    def name(self) -> str:
        return f"{self.runner}-{'compiled' if self.compiled else 'eager'}-{self.precision}-{self.adamw}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        parts = name.split("-")
        if len(parts) != 4 or parts[0] not in RUNNERS or parts[1] not in ("eager", "compiled") \
                or parts[2] not in PRECISIONS or parts[3] not in ADAMWS:  # fmt: skip
            raise argparse.ArgumentTypeError(
                f"variant {name!r}: expected RUNNER-COMPILE-PRECISION-ADAMW with RUNNER in {RUNNERS}, "
                f"COMPILE in (eager, compiled), PRECISION in {PRECISIONS}, ADAMW in {ADAMWS}, or {OFFICIAL!r}"
            )
        return cls(parts[0], parts[1] == "compiled", parts[2], parts[3])


@dataclass
class Result:
    name: str
    step_s: list[float] | None = None  # per timed step
    peak_bytes: int | None = None
    adamw_impl: str = ""
    problem: str = ""  # "unavailable (...)" or "failed (...)"

    def img_per_s(self, batch: int) -> float:
        return batch / statistics.median(self.step_s)


# ------------------------------------------------------------------ command line and config
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options before ``--``, Hydra overrides after it."""
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    options = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="vitt, 56/28 px crops, small heads: a CPU-sized step")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dinov2-repo", type=Path, help="a facebookresearch/dinov2 checkout: also time its step")
    parser.add_argument("--batch", type=int, help="images per step (default: 32, --tiny 8)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: 10, --tiny 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3, --tiny 2)")
    parser.add_argument("--variants", nargs="+", help="RUNNER-COMPILE-PRECISION-ADAMW names and/or 'official'")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--flops-only", action="store_true", help="count the step's FLOPs, time nothing")
    args = parser.parse_args(options)
    args.batch = args.batch or (8 if args.tiny else 32)
    args.steps = args.steps or (4 if args.tiny else 10)
    if args.warmup is None:
        args.warmup = 2 if args.tiny else 3
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    for name in args.variants or []:
        if name != OFFICIAL:
            Variant.parse(name)
    if args.variants and OFFICIAL in args.variants and not args.dinov2_repo:
        parser.error("variant 'official' needs --dinov2-repo")
    return args, overrides


def compose(overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="pretrain", overrides=overrides)


def base_overrides(args: argparse.Namespace, user: list[str]) -> list[str]:
    return [EXPERIMENT, *(TINY if args.tiny else []), f"data.batch_size_per_device={args.batch}", *user]


def variant_overrides(variant: Variant) -> list[str]:
    # explicit on both sides: null means "on with CUDA", which would make an eager variant compiled
    return [f"trainer.compile={str(variant.compiled).lower()}", f"optim.fused={str(variant.adamw == 'fused').lower()}"]


# ------------------------------------------------------------------ batches
def make_batches(cfg: DictConfig, batch: int, count: int, device: torch.device, seed: int = 0) -> list[dict]:
    """Collated multi-crop batches with vitreg's own iBOT masks (their masked count differs per batch,
    as in training); random pixels, since speed does not depend on them."""
    a = cfg.augment
    collator = multicrop_collator(cfg)  # the run's mask ratios and probability
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        masks, upperbound = collator.make_masks(2 * batch, random.Random(seed * 1000 + index))
        cpu = {
            "global_crops": torch.randn(2 * batch, 3, a.global_crops_size, a.global_crops_size, generator=generator),
            "local_crops": torch.randn(a.local_crops_number * batch, 3, a.local_crops_size, a.local_crops_size,
                                       generator=generator),
            **mask_fields(masks, upperbound),
            "labels": torch.zeros(batch, dtype=torch.long),
        }  # fmt: skip
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu.items()})
    return batches


# ------------------------------------------------------------------ FLOPs
def flops_per_image(args: argparse.Namespace, cfg: DictConfig, batch: dict, user: list[str]) -> tuple[float, float]:
    """(actual, nominal) FLOPs per image: with the config's drop path, and with drop path off."""
    nominal_cfg = compose([*base_overrides(args, user), "model.drop_path_rate=0.0"])
    return step_flops(cfg, batch) / args.batch, step_flops(nominal_cfg, batch) / args.batch


def peak_bf16_flops(device: torch.device) -> float | None:
    return peak_flops(device)  # the one table of device peaks, shared with the training's perf/mfu


# ------------------------------------------------------------------ device helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM, the peak RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return None


class StepClock:
    """Marks at step boundaries. CUDA: events, read once at the end, so timing adds no host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.marks = device, []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.device.type == "cuda":
            synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def time_steps(step: Callable[[int], None], warmup: int, steps: int, device: torch.device) -> tuple[list[float], int]:
    """Per-step seconds of ``steps`` steps after ``warmup`` untimed ones, and the peak memory meanwhile."""
    for it in range(warmup):
        step(it)
    synchronize(device)
    reset_peak_memory(device)
    clock = StepClock(device)
    for it in range(warmup, warmup + steps):
        clock.mark()
        step(it)
    clock.mark()
    return clock.durations(), peak_memory(device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def adamw_impl(optimizer: torch.optim.Optimizer) -> str:
    """What AdamW actually runs: its flags, or torch's default (foreach on CUDA, a for-loop on CPU)."""
    groups = optimizer.param_groups  # per-group flags (DINOv2 sets foreach per group) win over defaults
    if all(g.get("fused") for g in groups):
        return "fused"
    foreach = [g.get("foreach") for g in groups]
    if all(f is None for f in foreach):
        return "foreach" if all(p.is_cuda for g in groups for p in g["params"]) else "for-loop"
    return "foreach" if all(foreach) else "mixed"


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold the previous variant's modules
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ what this torch and this vitreg support
def compile_entry_point() -> Callable | None:
    """vitreg's per-block compile as DINOv2Module.configure_model applies it for ``trainer.compile``
    (``vitreg.lit.compile.compile_objective``), or None in a vitreg that has none yet."""
    try:
        from vitreg.lit.compile import compile_objective
    except ImportError:
        return None
    return compile_objective


def any_compiled(module: torch.nn.Module) -> bool:
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
        for m in module.modules()
    )


def fused_problem(device: torch.device) -> str | None:
    try:
        p = torch.zeros(2, device=device, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError) as error:
        return f"fused AdamW not supported on {device.type}: {str(error).splitlines()[0]}"
    return None


def bf16_problem(device: torch.device) -> str | None:
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = torch.nn.Linear(4, 4, device=device)(torch.ones(2, 4, device=device))
    except RuntimeError as error:
        return f"bf16 autocast fails on {device.type}: {str(error).splitlines()[0]}"
    return None if out.dtype == torch.bfloat16 else f"bf16 autocast is a no-op on {device.type}"


def default_variants(device: torch.device) -> list[str]:
    if device.type == "cuda":  # today's trainer=gpu step first: the baseline of the ratios
        names = ["loop-eager-bf16-foreach", "loop-eager-bf16-fused", "loop-compiled-bf16-fused",
                 "lightning-eager-bf16-foreach", "lightning-compiled-bf16-fused"]  # fmt: skip
    else:
        names = ["loop-eager-fp32-foreach", "loop-eager-fp32-fused", "loop-compiled-fp32-foreach",
                 "lightning-eager-fp32-foreach"]  # fmt: skip
        if bf16_problem(device) is None:
            names.insert(2, "loop-eager-bf16-foreach")
    return names


# ------------------------------------------------------------------ vitreg runners
def build_module(cfg: DictConfig, device: torch.device):
    torch.manual_seed(0)
    with torch.device(device):
        return DINOv2Module(cfg)


def teacher_ema(objective) -> Callable[[float], None]:
    """The EMA update DINOv2Module uses: the cached ``TeacherEMA``, or ``ema_update_`` in a vitreg without it."""
    try:
        from vitreg.ssl.ema import TeacherEMA
    except ImportError:
        from vitreg.ssl.ema import ema_update_

        return lambda momentum: ema_update_(objective.teacher, objective.student, momentum)
    return TeacherEMA(objective.teacher, objective.student)


def loop_step(module, optimizer, batches: list[dict], variant: Variant, device: torch.device) -> Callable[[int], None]:
    """One iteration of DINOv2's train loop on vitreg's objective (DINOv2Module's order and hooks)."""
    objective, schedules, clip = module.objective, module.schedules, module.cfg.optim.clip_grad
    ema = teacher_ema(objective)

    def step(it: int) -> None:
        apply_schedules(optimizer, lr=schedules.lr(it), wd=schedules.wd(it), last_layer_lr=schedules.last_layer_lr(it))
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, variant.precision):
            terms = objective(batches[it % len(batches)], teacher_temp=schedules.teacher_temp(it))
        objective.commit_centers()
        terms["loss"].backward()
        for sub in objective.student.values():
            torch.nn.utils.clip_grad_norm_(sub.parameters(), clip)
        optimizer.step()
        ema(schedules.momentum(it))
        if not math.isfinite(terms["loss"].item()):  # DINOv2's loop reads its losses once per step
            raise FloatingPointError(f"step {it}: non-finite loss")

    return step


def run_loop(cfg: DictConfig, variant: Variant, batches: list[dict], args, device: torch.device) -> Result:
    module = build_module(cfg, device)
    if variant.compiled:  # what DINOv2Module.configure_model does for trainer.compile=true
        compile_entry_point()(module.objective, True, device)
        if not any_compiled(module.objective):
            return Result(variant.name, problem="unavailable (compile_objective compiled nothing)")
    module.train()
    o = cfg.optim
    flag = {"fused": True} if variant.adamw == "fused" else {"foreach": True}  # as DINOv2: foreach groups
    groups = param_groups(module.student, o.layerwise_decay, o.patch_embed_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=module.lr, betas=(o.adamw_beta1, o.adamw_beta2), **flag)
    step = loop_step(module, optimizer, batches, variant, device)
    durations, peak = time_steps(step, args.warmup, args.steps, device)
    return Result(variant.name, durations, peak, adamw_impl(optimizer))


class Stream(torch.utils.data.IterableDataset):
    """The prepared batches, round and round (already on the device: Lightning's transfer is a no-op)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict]:
        index = 0
        while True:
            yield self.batches[index % len(self.batches)]
            index += 1


def lightning_timer(warmup: int, steps: int, device: torch.device):
    class Timer(L.Callback):
        def __init__(self) -> None:
            self.clock, self.peak = StepClock(device), None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                synchronize(device)
                reset_peak_memory(device)
            if batch_idx >= warmup:
                self.clock.mark()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx == warmup + steps - 1:
                self.clock.mark()
                synchronize(device)
                self.peak = peak_memory(device)

    return Timer()


def quiet_lightning() -> None:
    """Lightning's banners and the expected warnings (the teacher is in eval mode on purpose) are noise here."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (r".*module\(s\) in eval mode.*", r".*srun.*", r".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)


def run_lightning(cfg: DictConfig, variant: Variant, batches: list[dict], args, device: torch.device) -> Result:
    quiet_lightning()
    module = build_module(cfg, device)
    if variant.adamw == "fused" and not module.configure_optimizers().defaults.get("fused"):
        return Result(variant.name, problem="unavailable (optim.fused=true is not honoured by DINOv2Module yet)")
    timer = lightning_timer(args.warmup, args.steps, device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if variant.precision == "bf16" else "32-true",
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        gradient_clip_val=cfg.optim.clip_grad or None,  # routed to DINOv2Module.configure_gradient_clipping
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(Stream(batches), batch_size=None, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    if variant.compiled != any_compiled(module):
        return Result(variant.name, problem=f"unavailable (trainer.compile={variant.compiled} was not honoured)")
    return Result(variant.name, timer.clock.durations(), timer.peak, adamw_impl(trainer.optimizers[0]))


def run_variant(name: str, args, user: list[str], batches: list[dict], device: torch.device) -> Result:
    variant = Variant.parse(name)
    problem = (
        (fused_problem(device) if variant.adamw == "fused" else None)
        or (bf16_problem(device) if variant.precision == "bf16" else None)
        or ("vitreg has no trainer.compile support yet" if variant.compiled and not compile_entry_point() else None)
    )
    if problem:
        return Result(name, problem=f"unavailable ({problem})")
    cfg = compose([*base_overrides(args, user), *variant_overrides(variant)])
    runner = run_loop if variant.runner == "loop" else run_lightning
    return runner(cfg, variant, batches, args, device)


# ------------------------------------------------------------------ the official step
@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A 1-rank process group: the official iBOT Sinkhorn-Knopp all-reduces unconditionally, and FSDP1
    needs one. Only around the official step, so vitreg's variants run without (as on one GPU)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_official(args, cfg: DictConfig, batches: list[dict], device: torch.device, patches: list[str]) -> Result:
    with torch.device("meta"):  # vitreg's schedules: the same values feed the official step
        schedules = DINOv2Module(cfg).schedules
    with single_process_group(device):
        torch.manual_seed(0)
        model, optimizer, ocfg = official_dinov2.build_official(
            args.dinov2_repo.resolve(), cfg, args.batch, device, patches
        )
        count, expected = official_dinov2.student_parameter_count(model), vitreg_student_parameters(cfg)
        same = "the same as vitreg's" if count == expected else f"vitreg has {expected / 1e6:.2f} M: shapes differ"
        print(f"official student: {count / 1e6:.2f} M parameters, {same}", flush=True)
        step = official_dinov2.official_step(model, optimizer, ocfg, device, schedules)
        durations, peak = time_steps(lambda it: step(batches[it % len(batches)], it), args.warmup, args.steps, device)
        impl = adamw_impl(optimizer)
        del model, optimizer  # before the process group goes
    return Result(OFFICIAL, durations, peak, impl)


# ------------------------------------------------------------------ report
def vitreg_student_parameters(cfg: DictConfig) -> int:
    with torch.device("meta"):  # shapes only
        return sum(p.numel() for p in build_objective(cfg).student.parameters())


def header(args, cfg: DictConfig, device: torch.device, user: list[str]) -> None:
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "unknown"  # fmt: skip
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    )
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if device.type == "cpu" else ""
    print(f"bench_step: {where}{load}, torch {torch.__version__}, vitreg {commit}")
    a, vit = cfg.augment, to_dataclass(ModelConfig, cfg.model).vit_config(cfg.augment.global_crops_size)
    print(
        f"config: {EXPERIMENT}{' --tiny' if args.tiny else ''}{' ' + ' '.join(user) if user else ''} | "
        f"{cfg.model.arch}/{vit.patch_size} + {vit.num_register_tokens} registers, ffn {vit.ffn_layer}, "
        f"{args.batch} images/step (2x{a.global_crops_size} + {a.local_crops_number}x{a.local_crops_size} px), "
        f"drop path {vit.drop_path_rate}, heads {cfg.ssl.dino.head_n_prototypes}/{cfg.ssl.ibot.head_n_prototypes} "
        f"prototypes, centering {cfg.ssl.centering}"
    )
    print(f"vitreg student: {vitreg_student_parameters(cfg) / 1e6:.2f} M parameters")
    print(
        f"timing: median of {args.steps} steps after {args.warmup} warm-up steps; batches already on the device; "
        "loop = objective + AdamW as DINOv2's train.py, lightning = DINOv2Module in L.Trainer (no callbacks)"
    )


def result_line(result: Result, batch: int, flops: tuple[float, float], peak: float | None, base: Result | None) -> str:
    if result.problem:
        return f"variant {result.name}: {result.problem}"
    img_s = result.img_per_s(batch)
    ms = [1e3 * s for s in result.step_s]
    memory = f"{result.peak_bytes / 2**30:.2f} GiB" if result.peak_bytes is not None else "n/a"
    mfu = "n/a" if peak is None else f"{img_s * flops[0] / peak:.1%} actual / {img_s * flops[1] / peak:.1%} nominal"
    ratio = f" | x{img_s / base.img_per_s(batch):.2f} vs {base.name}" if base else ""
    return (
        f"variant {result.name}: {img_s:.2f} img/s | step {statistics.median(ms):.1f} ms median "
        f"({min(ms):.1f}-{max(ms):.1f}) | peak mem {memory} | MFU {mfu} | adamw {result.adamw_impl}{ratio}"
    )


def run_safely(name: str, run: Callable[[], Result], device: torch.device) -> Result:
    """A variant that fails is reported as such; the others still run."""
    try:
        return run()
    except Exception as error:  # any failure of one variant is a result to print
        traceback.print_exc()
        return Result(name, problem=f"failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    finally:
        free_memory(device)


def main(argv: list[str]) -> int:
    args, user = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(base_overrides(args, user))
    batches = make_batches(cfg, args.batch, count=4, device=device)
    header(args, cfg, device, user)
    flops = flops_per_image(args, cfg, batches[0], user)
    peak = peak_bf16_flops(device)
    padded = f", padded to {batches[0]['upperbound']}" if cfg.ssl.ibot.get("pad_masked_tokens", False) else ""
    print(
        f"FLOPs per image (torch.utils.flop_counter, fake tensors, batch {args.batch}, "
        f"{batches[0]['mask_indices'].numel()} masked tokens{padded}): actual {flops[0] / 1e12:.4f} TFLOP "
        f"(drop path {cfg.model.drop_path_rate}, batch-subset), nominal {flops[1] / 1e12:.4f} TFLOP (drop path off); "
        f"MFU peak: {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s dense bf16'}",
        flush=True,
    )
    if args.flops_only:
        return 0
    names = args.variants or [*default_variants(device), *([OFFICIAL] if args.dinov2_repo else [])]
    results: list[Result] = []
    vitreg_names = [n for n in names if n != OFFICIAL]
    for name in vitreg_names:
        result = run_safely(name, lambda name=name: run_variant(name, args, user, batches, device), device)
        base = next((r for r in results if not r.problem), None)
        results.append(result)
        print(result_line(result, args.batch, flops, peak, base), flush=True)
    if device.type == "cpu":  # other processes on the same cores distort CPU timings: say how busy it was
        print("load average after the vitreg variants: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    timed = [r for r in results if not r.problem]
    best = max(timed, key=lambda r: r.img_per_s(args.batch), default=None)
    if OFFICIAL not in names:
        if best is None:
            print("no vitreg variant ran")
            return 1
        print(f"best vitreg variant: {best.name}")
        print(f"vitreg img/s {best.img_per_s(args.batch):.2f}")
        return 0
    patches: list[str] = []
    official = run_safely(OFFICIAL, lambda: run_official(args, cfg, batches, device, patches), device)
    print(result_line(official, args.batch, flops, peak, timed[0] if timed else None))
    print(f"official patches applied: {'; '.join(patches) or 'none'}")
    if best is None or official.problem:
        print("no ratio: " + ("no vitreg variant ran" if best is None else "the official step did not run"))
        return 1
    ratio = best.img_per_s(args.batch) / official.img_per_s(args.batch)
    print(f"best vitreg variant: {best.name} ({best.img_per_s(args.batch):.2f} img/s) over the official step "
          f"({official.img_per_s(args.batch):.2f} img/s)")  # fmt: skip
    print(f"vitreg/official img/s ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

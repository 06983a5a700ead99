"""Build everything a pretraining run needs from a validated config, and fit."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from vitreg.config import active_loggers, validate_config
from vitreg.lit.callbacks import DataHealth
from vitreg.lit.checkpointing import (
    AtomicCheckpointIO,
    FinalCheckpoint,
    checkpoint_callback,
    checkpoint_dir,
    last_checkpoint_path,
    newest_good_checkpoint,
    readable,
    resume_candidates,
)
from vitreg.lit.csv_logger import ResumableCSVLogger
from vitreg.lit.data import SyntheticDataModule, WebDataModule
from vitreg.lit.flops import flops_per_image
from vitreg.lit.module import DINOv2Module
from vitreg.lit.perf import PerfMonitor
from vitreg.lit.probes import build_online_probes
from vitreg.lit.progress import LineProgress, progress_mode
from vitreg.lit.resume import ExactResume, restore_wandb_id
from vitreg.lit.resume_check import check_resume_config
from vitreg.lit.strategies import build_strategy
from vitreg.lit.telemetry import ArtifactTelemetry
from vitreg.lit.tensorboard_logger import build_tensorboard_logger
from vitreg.lit.wandb_logger import build_wandb_logger, wandb_loggers
from vitreg.runtime.console import quiet_other_ranks
from vitreg.runtime.launch import check_launcher
from vitreg.runtime.signals import PreemptionHandler, slurm_plugins
from vitreg.runtime.sweep_summary import write_run_summary
from vitreg.utils.io import atomic_write_bytes, checkpoint_metadata, remove_stale_temp_files

log = logging.getLogger(__name__)
# The teacher is in eval mode on purpose (no drop path); Lightning warns about any eval-mode module.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def resolve_precision(cfg: DictConfig) -> str:
    if cfg.trainer.precision:
        return cfg.trainer.precision
    return "bf16-mixed" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "32-true"


def build_logger(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> list[Logger] | bool:
    """The configured loggers (``vitreg.config.active_loggers``: one or several, e.g. ``logger=[csv,wandb]``),
    or False for none. ``resume_step``: the step of the checkpoint being resumed; CSV rows from that step on
    (logged before a crash, about to be logged again) are dropped, earlier ones kept."""
    loggers: list[Logger] = []
    for kind in active_loggers(cfg.logger):
        if kind == "csv":
            # rows reach the disk at every logged step (an appended line), so a crash loses at most one
            loggers.append(
                ResumableCSVLogger(
                    save_dir=str(run_dir),
                    name="logs",
                    version="",
                    drop_from_step=resume_step,
                    flush_logs_every_n_steps=1,
                )
            )
        elif kind == "tensorboard":
            loggers.append(build_tensorboard_logger(run_dir, resume_step))
        elif kind == "wandb":
            loggers.append(build_wandb_logger(cfg, run_dir))
    return loggers or False


def finish_wandb(trainer: L.Trainer) -> None:
    """Flush and close the W&B run, so its files are complete when pretrain returns (a sweep's next
    job, a test reading the offline run, ``wandb sync``)."""
    if trainer.is_global_zero:
        for logger in wandb_loggers(trainer):
            logger.experiment.finish()


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """An explicit ``ckpt_path`` wins (it must be intact); else (``resume=auto``) the run's newest intact
    checkpoint by step (a damaged one is skipped with a warning); else None."""
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path: no checkpoint at {cfg.ckpt_path}")
        problem = readable(Path(cfg.ckpt_path), verify_checksum=True)
        if problem:
            raise RuntimeError(f"ckpt_path: {cfg.ckpt_path} cannot be resumed: {problem}")
        return cfg.ckpt_path
    if cfg.resume == "never":
        if resume_candidates(checkpoint_dir(run_dir)):
            log.warning("resume=never: starting afresh although %s holds checkpoints", checkpoint_dir(run_dir))
        return None
    found = newest_good_checkpoint(checkpoint_dir(run_dir))
    return str(found) if found else None


def max_training_steps(cfg: DictConfig) -> int:
    return cfg.trainer.max_steps or cfg.optim.epochs * cfg.optim.official_epoch_length


def accept_resume(cfg: DictConfig, resume: str) -> int:
    """The checkpoint's step, once its config has been compared with this one (``ResumeConfigError``
    when a change would make the resumed run a different experiment)."""
    meta = checkpoint_metadata(resume)
    saved = (meta.get("hyper_parameters") or {}).get("cfg")
    new = OmegaConf.to_container(cfg, resolve=True)
    check_resume_config(saved, new, resume, allowed=cfg.resume_allow_changes)
    return int(meta["global_step"])


def is_global_zero_process() -> bool:
    """Rank 0 before the Trainer exists (from the launcher's environment, as Lightning reads it)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def finished_summary(cfg: DictConfig, run_dir: Path, resume: str, step: int, max_steps: int) -> dict:
    """What pretrain returns for a run that has nothing left to do: no Trainer, no logger (so no empty
    W&B run), config.yaml untouched."""
    message = (
        f"run {run_dir} already finished: {resume} is at step {step} of {max_steps}; raise trainer.max_steps "
        "to train on, or start another run with run_name=<new name>"
    )
    log.debug(message)  # train/pretrain.py prints it: one line, not a log record too
    return {
        "run_dir": str(run_dir),
        "config": str(run_dir / "config.yaml"),
        "checkpoint": resume,
        "steps": step,
        "skipped_steps": 0,
        "finished": True,
        "already_finished": message,
    }


def pretrain(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> dict:
    """Train; returns a summary (paths, steps, online probe accuracies, telemetry cost). ``extra_callbacks``
    join the configured ones (benchmarks, tests)."""
    validate_config(cfg)
    quiet_other_ranks()  # probe lines, "resuming from"...: rank 0 prints them, the others keep warnings
    check_launcher(cfg.trainer.num_nodes, cfg.trainer.devices, os.environ)  # not a silent 30-minute wait
    run_dir = Path(cfg.paths.run_dir)
    if is_global_zero_process():  # no writer is active yet: what a killed write left is garbage
        remove_stale_temp_files(checkpoint_dir(run_dir))
    max_steps = max_training_steps(cfg)
    resume = find_resume_checkpoint(cfg, run_dir)
    resume_step = accept_resume(cfg, resume) if resume else None
    if resume_step is not None and resume_step >= max_steps:
        return finished_summary(cfg, run_dir, resume, resume_step, max_steps)
    # checks the shards: a missing one refuses (or warns) before anything is written or built
    datamodule = SyntheticDataModule(cfg) if cfg.data.name == "synthetic" else WebDataModule(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    L.seed_everything(cfg.seed, workers=True)

    callbacks: list[L.Callback] = [
        checkpoint_callback(run_dir, cfg.callbacks.checkpoint_every_n_steps, cfg.callbacks.keep_last_k),
        FinalCheckpoint(last_checkpoint_path(run_dir)),
    ]
    if cfg.data.name == "webdataset" or cfg.data.synthetic.as_shards:
        w = cfg.data.webdataset
        callbacks.append(DataHealth(w.max_skip_fraction, w.min_samples_before_abort))
    callbacks.append(ExactResume(run_dir=run_dir))
    knn, linear = build_online_probes(cfg, datamodule)  # None unless callbacks.online_knn / online_linear
    callbacks.extend(probe for probe in (knn, linear) if probe is not None)
    telemetry = None
    if cfg.callbacks.telemetry.enabled:
        telemetry = ArtifactTelemetry(cfg, run_dir)
        callbacks.append(telemetry)
    # SIGUSR1/SIGTERM: save last.ckpt, requeue under SLURM, stop (the only requeue owner)
    preemption = PreemptionHandler(
        last_checkpoint_path(run_dir),
        cfg.runtime.signals,
        cfg.runtime.requeue,
        save_on_interrupt=cfg.runtime.save_on_interrupt,
    )
    callbacks.append(preemption)
    peak_tflops = cfg.trainer.get("peak_tflops")
    perf = PerfMonitor(
        cfg.data.batch_size_per_device,
        flops_per_image=lambda: flops_per_image(cfg),  # counted once, only where the device's peak is known
        peak_flops_override=peak_tflops * 1e12 if peak_tflops else None,
    )
    callbacks.append(perf)  # perf/* metrics every log_every_n_steps, to every logger
    # enable_progress_bar=false: neither bar nor lines; else trainer.progress picks (auto: lines off a TTY)
    if cfg.trainer.enable_progress_bar:  # a ProgressBar callback: Lightning adds no bar of its own
        lines = progress_mode(cfg.trainer.progress) == "lines"
        # the bar is tqdm's, named: Lightning's default turns into a Rich bar whenever `rich` is installed
        callbacks.append(LineProgress(perf) if lines else TQDMProgressBar())
    callbacks.extend(extra_callbacks or [])
    if resume and "wandb" in active_loggers(cfg.logger):
        restore_wandb_id(resume, run_dir)  # before the logger is built, so it continues the same run
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=build_strategy(cfg),
        precision=resolve_precision(cfg),
        max_steps=max_steps,
        max_epochs=-1,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        deterministic=cfg.trainer.deterministic,
        logger=build_logger(cfg, run_dir, resume_step),
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        gradient_clip_val=cfg.optim.clip_grad or None,  # routed to DINOv2Module.configure_gradient_clipping
        plugins=[
            AtomicCheckpointIO(),
            *slurm_plugins(),
        ],  # under SLURM: Lightning's auto-requeue off (PreemptionHandler owns it)
    )
    module = DINOv2Module(cfg, world_size=trainer.world_size)
    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    finish_wandb(trainer)
    summary = {
        "run_dir": str(run_dir),
        "config": str(run_dir / "config.yaml"),
        # the newest by step, from the metadata alone: this run just wrote it, so no checksum pass over its tensors
        "checkpoint": str(next(iter(resume_candidates(checkpoint_dir(run_dir))), last_checkpoint_path(run_dir))),
        "logs": str(run_dir / "logs") if "csv" in active_loggers(cfg.logger) else str(run_dir),
        "steps": trainer.global_step,
        "skipped_steps": module.skipped_steps,
        "finished": trainer.global_step >= max_steps,
    }
    summary["preempted"] = preemption.preempted  # stopped by a signal (checkpoint saved)
    summary["requeued"] = preemption.requeued_job is not None  # and requeued (known on rank 0)
    loss = trainer.callback_metrics.get("train/loss")  # the last logged value (every log_every_n_steps)
    summary["final_loss"] = float(loss) if loss is not None else None
    if knn is not None:  # {"before": {"top1_k20": %, ...}, "after": {...}, "history": [(step, {...}), ...]}
        summary["knn"] = knn.results
    if linear is not None:  # {"after": % or None, "history": [(step, %), ...]}
        summary["linear"] = linear.results
    if telemetry is not None:
        summary["telemetry"] = str(run_dir / "telemetry")
        summary["telemetry_seconds"] = telemetry.seconds
        summary["telemetry_measurements"] = telemetry.measurements
    if trainer.is_global_zero:  # <run_dir>/summary.json: what a sweep summary reads (vitreg.runtime.sweep_summary)
        write_run_summary(run_dir, summary)
    return summary

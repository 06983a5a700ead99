"""The Lightning module: DINOv2's objective, optimiser, iteration-based schedules and EMA teacher.

Per step, as DINOv2's ``train.py``: apply schedules[step] to the param groups → forward/backward
→ clip gradients per sub-module (backbone, each head) → AdamW step → EMA update of the teacher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from vitreg.config import to_dataclass
from vitreg.data.transforms import DeviceNormalize
from vitreg.models import VisionTransformer, load_backbone_weights
from vitreg.models.config import ModelConfig
from vitreg.ssl.config import HeadConfig, OptimConfig, SSLConfig
from vitreg.ssl.ema import TeacherEMA
from vitreg.ssl.heads import DINOHead
from vitreg.ssl.objective import DINOv2Objective
from vitreg.ssl.param_groups import apply_schedules, param_groups
from vitreg.ssl.schedules import build_schedules, scaled_lr
from vitreg.utils.distributed import all_reduce_

log = logging.getLogger(__name__)

SCHEDULE_NAMES = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")  # logged every step
SCHEDULE_TABLE_STEPS = 1024  # rows of the device table the logged schedule values are read from


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the step and the term."""


def skips_allowed(max_skipped_steps: float, steps_tried: int) -> int:
    """How many skipped steps ``ssl.max_skipped_steps`` allows: >= 1 is a count; in (0, 1) a fraction
    of the steps tried so far, and never less than one skip."""
    if max_skipped_steps >= 1:
        return int(max_skipped_steps)
    return max(1, int(max_skipped_steps * steps_tried))


def use_fused_adamw(fused: bool | None, device: torch.device, precision: str | None, clip_grad: float | None) -> bool:
    """``optim.fused``: null is on with CUDA (one kernel for the whole update; handles FSDP2's DTensors),
    the foreach implementation on the CPU. Not by default under 16-mixed: Lightning then leaves the
    unscaling to the fused kernel, after the per-module clipping, which would clip scaled gradients."""
    scaled = precision in ("16-mixed", "16")
    if fused is None:
        return device.type == "cuda" and not scaled
    if fused and scaled and clip_grad:
        raise ValueError(
            "optim.fused=true with trainer.precision=16-mixed would clip the still-scaled gradients "
            "(optim.clip_grad); use trainer.precision=bf16-mixed or optim.fused=false"
        )
    return bool(fused)


@dataclass
class PendingStep:
    """A training step's terms (detached), kept from its forward to the verdict after its backward."""

    step: int
    terms: dict[str, torch.Tensor]
    batch_size: int


def drop_step_output(closure) -> None:
    """Make Lightning hand ``{}`` to ``on_train_batch_end`` for this step, as when ``training_step``
    returns None: the probes must not train on a skipped step's features. The loop reads the result
    the closure cached (``Closure._result``; Lightning 2.6) and returns ``{}`` when its loss is None."""
    result = getattr(closure, "_result", None)
    if result is None or not hasattr(result, "loss"):
        raise RuntimeError("cannot drop the step's output: Lightning's closure no longer caches its result")
    result.loss = None


def build_objective(cfg: DictConfig) -> DINOv2Objective:
    """Student backbone + heads from the config; the teacher is a deep copy made by the objective."""
    model = to_dataclass(ModelConfig, cfg.model)
    backbone = VisionTransformer(model.vit_config(cfg.augment.global_crops_size))
    if model.pretrained_weights:
        load_backbone_weights(backbone, model.pretrained_weights)
        log.info("student backbone initialised from %s", model.pretrained_weights)
    ssl = to_dataclass(SSLConfig, cfg.ssl)

    def head(h: HeadConfig) -> DINOHead:
        return DINOHead(
            backbone.embed_dim, h.head_n_prototypes, h.head_hidden_dim, h.head_bottleneck_dim, h.head_nlayers
        )

    ibot_head = head(ssl.ibot) if ssl.ibot.loss_weight > 0 and ssl.ibot.separate_head else None
    return DINOv2Objective(backbone, head(ssl.dino), ibot_head, ssl)


class DINOv2Module(L.LightningModule):
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **kwargs) -> DINOv2Module:  # type: ignore[override]
        """Lightning's loader, always with ``weights_only=True``: a checkpoint file never runs code."""
        kwargs["weights_only"] = True
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)

    def __init__(self, cfg: DictConfig | dict, world_size: int = 1) -> None:
        super().__init__()
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        # Stored in every checkpoint, so DINOv2Module.load_from_checkpoint(path) needs nothing else.
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True), "world_size": world_size})
        self.cfg = cfg
        self.objective = build_objective(cfg)
        self.crop_normalize = DeviceNormalize()  # uint8 crops (augment.crops_dtype) normalised on the device
        self.optim = optim = to_dataclass(OptimConfig, cfg.optim)
        teacher = self.objective.cfg.teacher
        self.global_batch = cfg.data.batch_size_per_device * world_size
        self.lr = scaled_lr(optim.base_lr, self.global_batch, optim.scaling_rule)
        self.schedules = build_schedules(
            base_lr=self.lr,
            min_lr=optim.min_lr,
            epochs=optim.epochs,
            warmup_epochs=optim.warmup_epochs,
            weight_decay=optim.weight_decay,
            weight_decay_end=optim.weight_decay_end,
            momentum_teacher=teacher.momentum_teacher,
            final_momentum_teacher=teacher.final_momentum_teacher,
            warmup_teacher_temp=teacher.warmup_teacher_temp,
            teacher_temp=teacher.teacher_temp,
            warmup_teacher_temp_epochs=teacher.warmup_teacher_temp_epochs,
            freeze_last_layer_epochs=optim.freeze_last_layer_epochs,
            epoch_length=optim.official_epoch_length,
        )
        self.on_nonfinite = self.objective.cfg.on_nonfinite
        self.max_skipped_steps = self.objective.cfg.max_skipped_steps
        self.skipped_steps = 0  # over the whole run: kept in checkpoints
        self._teacher_ema = TeacherEMA(self.teacher, self.student)
        self._pending: PendingStep | None = None
        self._stepped = False
        self._schedule_table: tuple[int, torch.Tensor | None] = (0, None)

    @property
    def student(self) -> torch.nn.ModuleDict:
        return self.objective.student

    @property
    def teacher(self) -> torch.nn.ModuleDict:
        return self.objective.teacher

    # ------------------------------------------------------------------ distribution
    def configure_model(self) -> None:
        # trainer=fsdp (ModelParallelStrategy) sets a device mesh: shard student and teacher with FSDP2.
        # Lightning calls this before configure_optimizers, so the optimiser gets the sharded parameters.
        # Gradient clipping and the EMA work unchanged on the DTensor parameters (same names, same shards).
        # trainer.compile: per-block compile, before sharding, for every strategy; the module is still on the
        # CPU here (Lightning moves it later), so the target device is the strategy's. Idempotent.
        from vitreg.lit.compile import compile_objective

        if self._trainer is not None:  # load_from_checkpoint calls this hook without a Trainer: nothing to compile
            compile_objective(self.objective, self.cfg.trainer.get("compile"), self._trainer.strategy.root_device)
        if self.device_mesh is None:
            return  # one process or DDP: nothing to do
        from vitreg.lit.strategies import shard_objective

        shard_objective(self.objective, self.device_mesh["data_parallel"], self.cfg.trainer.fsdp)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        optim = self.optim
        groups = param_groups(self.student, optim.layerwise_decay, optim.patch_embed_lr_mult)
        device = next(self.student.parameters()).device  # Lightning moved the module before this hook
        precision = self._trainer.precision if self._trainer is not None else None
        fused = use_fused_adamw(optim.fused, device, precision, optim.clip_grad)
        kwargs = {"fused": True} if fused else {}  # else the default: foreach on CUDA and on the CPU
        return torch.optim.AdamW(groups, lr=self.lr, betas=(optim.adamw_beta1, optim.adamw_beta2), **kwargs)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        step = self.global_step
        apply_schedules(
            self.trainer.optimizers[0],
            lr=self.schedules.lr(step),
            wd=self.schedules.wd(step),
            last_layer_lr=self.schedules.last_layer_lr(step),
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # DINOv2 clips each student sub-module on its own (backbone, dino_head, ibot_head), not one global norm.
        clip = self.optim.clip_grad
        if clip and clip > 0:
            for module in self.student.values():
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # The EMA update belongs to the optimiser step, not to on_train_batch_end: Lightning runs the
        # callbacks' on_train_batch_end (checkpointing, ...) before the module's, so a teacher updated
        # there would be saved one update behind the student and global_step.
        self._stepped = False

        def step_then_verdict():
            # training_step, zero_grad, backward; then accept or skip, before clipping and AdamW
            loss = optimizer_closure()
            if self._accept_step(optimizer):
                return loss
            drop_step_output(optimizer_closure)
            return None  # under 16-mixed the grad scaler then steps nothing

        super().optimizer_step(epoch, batch_idx, optimizer, step_then_verdict)
        if self._stepped:  # global_step is incremented after this hook returns
            self._teacher_ema(self.schedules.momentum(self.global_step))

    # ------------------------------------------------------------------ step
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 crops arrive as the loader made them (4x fewer bytes to copy): normalise them here, on
        the device, before any hook or the step sees them. Float crops pass unchanged."""
        if isinstance(batch, dict) and "global_crops" in batch:
            for key in ("global_crops", "local_crops"):
                if batch.get(key) is not None:
                    batch[key] = self.crop_normalize(batch[key])
        return batch

    def training_step(self, batch: dict, batch_idx: int):
        step = self.global_step
        terms = self.objective(batch, teacher_temp=self.schedules.teacher_temp(step))
        # The verdict on the terms waits for the backward (optimizer_step): checking them here would
        # stall the device between forward and backward. A bad step's backward is wasted, nothing else.
        detached = {k: v.detach() for k, v in terms.items()}
        self._pending = PendingStep(step, detached, batch["global_crops"].shape[0] // 2)
        # the teacher's CLS of the global crops rides along (detached) for the online linear probe
        return {"loss": terms["loss"], "teacher_cls": self.objective.teacher_cls}

    def _accept_step(self, optimizer) -> bool:
        """Accept the step whose backward just ran (commit its centres, log it), or skip it: no
        gradients, so AdamW moves no moment or step counter, the staged centres dropped, no EMA."""
        pending, self._pending = self._pending, None
        if not self._all_finite(pending.terms):  # the step's one host sync
            optimizer.zero_grad(set_to_none=True)
            self.objective.discard_centers()
            self._skip_step(pending.step, pending.terms)  # raises, or counts the skip
            return False
        self.objective.commit_centers()
        self._log_step(pending)
        self._stepped = True
        return True

    def _log_step(self, pending: PendingStep) -> None:
        metrics = {f"train/{k}": v for k, v in pending.terms.items()}
        metrics.update(self._schedule_values(pending.step))
        # Nothing in the progress bar: Lightning reads every bar value to the host at every batch from
        # its first log on (a sync per step); train/loss reaches the loggers every log_every_n_steps.
        self.log_dict(metrics, batch_size=pending.batch_size, sync_dist=False, prog_bar=False)

    def _schedule_values(self, step: int) -> dict[str, torch.Tensor]:
        """The schedules at ``step`` as device scalars, read from a table sent once per
        ``SCHEDULE_TABLE_STEPS`` steps: each logged Python float would be a blocking copy to the device."""
        start, table = self._schedule_table
        if table is None or table.device != self.device or not start <= step < start + len(table):
            rows = [
                [getattr(self.schedules, n)(s) for n in SCHEDULE_NAMES]
                for s in range(step, step + SCHEDULE_TABLE_STEPS)
            ]
            start, table = step, torch.tensor(rows, dtype=torch.float32, device=self.device)  # as log() rounds a float
            self._schedule_table = (start, table)
        row = table[step - start]
        return {name: row[i] for i, name in enumerate(SCHEDULE_NAMES)}

    def _all_finite(self, terms: dict) -> bool:
        # one host sync for all the terms
        finite = torch.stack([torch.isfinite(t).all() for t in terms.values()]).all().float()
        all_reduce_(finite, "min")  # every rank skips or raises together
        return bool(finite.item())

    def _skip_step(self, step: int, terms: dict) -> None:
        """A non-finite step (only now do we sync to describe it): raise, or count it and raise once
        more steps were skipped than ``ssl.max_skipped_steps`` allows."""
        names = self.objective.loss_term_names()
        bad = [k for k in [*names, "loss"] if not torch.isfinite(terms[k]).all()]
        message = (
            f"non-finite loss at step {step}: {', '.join(bad) or 'on another rank'} "
            f"({', '.join(f'{k}={terms[k].item():.4g}' for k in names)})"
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(message + "; set ssl.on_nonfinite=skip to skip such steps instead")
        self.skipped_steps += 1
        steps_tried = step + 1  # global_step also counts skipped steps
        if self.skipped_steps > skips_allowed(self.max_skipped_steps, steps_tried):
            raise NonFiniteLossError(
                f"step {step}: {self.skipped_steps} of {steps_tried} steps were skipped for a non-finite loss, "
                f"more than ssl.max_skipped_steps={self.max_skipped_steps} allows; the last: {message}. "
                "The run is diverging: set ssl.on_nonfinite=raise to stop at the first bad step and see its "
                "terms, lower optim.base_lr, lengthen optim.warmup_epochs or set optim.clip_grad, or "
                "raise ssl.max_skipped_steps"
            )
        log.warning("%s: step skipped (%d so far)", message, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps), rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps  # max_skipped_steps bounds the whole run

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

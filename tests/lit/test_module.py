"""The Lightning module's step: schedules reach the optimiser, clipping is per sub-module, the EMA
teacher follows the student after each optimiser step, and non-finite losses never pass silently."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.conftest import TINY, compose_config
from vitreg.lit.data import SyntheticDataModule
from vitreg.lit.module import DINOv2Module, NonFiniteLossError


def fit(cfg, steps: int, module: DINOv2Module | None = None, callbacks=()) -> tuple[L.Trainer, DINOv2Module]:
    module = module or DINOv2Module(cfg)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=cfg.optim.clip_grad,
        callbacks=list(callbacks),
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=SyntheticDataModule(cfg))
    return trainer, module


class Recorder(L.Callback):
    """Records optimiser hyper-parameters right before each optimiser step and teacher/student weights."""

    def __init__(self):
        self.groups, self.before, self.after = [], [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.groups.append(
            [
                (g["lr"], g["weight_decay"], g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
                for g in optimizer.param_groups
            ]
        )
        self.before.append({k: v.detach().clone() for k, v in module.teacher.state_dict().items()})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(
            (
                {k: v.detach().clone() for k, v in module.student.state_dict().items()},
                {k: v.detach().clone() for k, v in module.teacher.state_dict().items()},
            )
        )


def test_schedules_are_applied_to_every_group_each_step():
    cfg = compose_config(TINY)
    rec = Recorder()
    _, module = fit(cfg, 4, callbacks=[rec])
    s = module.schedules
    for step, groups in enumerate(rec.groups):
        for lr, wd, lr_mult, wd_mult, last in groups:
            expected_lr = (s.last_layer_lr(step) if last else s.lr(step)) * lr_mult
            assert lr == pytest.approx(expected_lr) and wd == pytest.approx(s.wd(step) * wd_mult)
    # sqrt-batch/1024 scaling of base_lr (batch 4 per device, one device)
    assert module.lr == pytest.approx(cfg.optim.base_lr * (4 / 1024) ** 0.5)


def test_teacher_is_the_ema_of_the_student_after_each_step():
    # a low momentum and a big learning rate make one EMA update clearly visible
    cfg = compose_config(
        [*TINY, "ssl.teacher.momentum_teacher=0.5", "ssl.teacher.final_momentum_teacher=0.6", "optim.base_lr=2.0"]
    )
    rec = Recorder()
    _, module = fit(cfg, 3, callbacks=[rec])
    # The EMA runs inside optimizer_step, so every callback's on_train_batch_end (checkpointing,
    # telemetry) already sees the teacher of this step.
    for step in range(3):
        m = module.schedules.momentum(step)
        student, teacher = rec.after[step]
        before = rec.before[step]
        for name in ("backbone.cls_token", "backbone.blocks.0.attn.qkv.weight", "dino_head.last_layer.weight_v"):
            torch.testing.assert_close(teacher[name], m * before[name] + (1 - m) * student[name])
        if step > 0:  # the warmup starts at lr 0: the student first moves at step 1
            moved = teacher["backbone.blocks.0.attn.qkv.weight"] - before["backbone.blocks.0.attn.qkv.weight"]
            assert moved.abs().max() > 1e-4, "the EMA update must be visible"


def test_gradient_clipping_is_per_submodule():
    cfg = compose_config([*TINY, "optim.clip_grad=0.5"])
    module = DINOv2Module(cfg)
    for p in module.student.parameters():
        p.grad = torch.randn_like(p) * 10
    module.configure_gradient_clipping(None)
    for name, sub in module.student.items():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in sub.parameters()]))
        assert norm == pytest.approx(0.5, rel=1e-4), name


def test_logged_metrics():
    cfg = compose_config(TINY)
    trainer, _ = fit(cfg, 2)
    logged = set(trainer.callback_metrics)
    expected = {
        "train/loss",
        "train/dino_local_crops_loss",
        "train/dino_global_crops_loss",
        "train/koleo_loss",
        "train/ibot_loss",
        "train/teacher_entropy",
        "train/teacher_kl_to_uniform",
        "train/center_norm",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "last_layer_lr",
    }
    assert expected <= logged, expected - logged


class Poison(L.Callback):
    """Makes the student produce NaN from a given step on."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= self.step:
            batch["global_crops"][0, 0, 0, 0] = float("nan")


def test_nonfinite_loss_stops_the_run_naming_step_and_term():
    cfg = compose_config(TINY)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 2: .*dino_local_crops_loss.*ssl\.on_nonfinite=skip"
    ):
        fit(cfg, 5, callbacks=[Poison(2)])


def test_nonfinite_loss_can_skip_steps_without_touching_weights():
    cfg = compose_config([*TINY, "ssl.on_nonfinite=skip"])
    module = DINOv2Module(cfg)
    trainer, module = fit(cfg, 2, module=module)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        max_epochs=1,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Poison(0)],
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=SyntheticDataModule(cfg))
    # Lightning still counts the (empty) optimiser steps, so the schedules move on; no weight changes
    assert module.skipped_steps == 3 and trainer.global_step == 3
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    for k, v in module.student.state_dict().items():
        assert torch.equal(v, student_before[k]), k


def test_backbone_follows_the_recipe():
    from vitreg.config import to_dataclass
    from vitreg.models.config import ModelConfig

    cfg = compose_config(["experiment=dinov2_vitl14_reg4"])
    vit = to_dataclass(ModelConfig, cfg.model).vit_config(cfg.augment.global_crops_size)
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size, vit.img_size) == (1024, 24, 16, 14, 224)
    assert (vit.ffn_layer, vit.hidden_dim, vit.num_register_tokens) == ("swiglu", 2736, 4)
    assert (vit.drop_path_rate, vit.drop_path_uniform, vit.layerscale_init) == (0.4, True, 1e-5)
    assert (vit.antialias, vit.offset) == (True, 0.0)
    vitg = compose_config(["model=vitg"])
    # ffn_layer: null keeps the size's own
    assert to_dataclass(ModelConfig, vitg.model).vit_config(224).ffn_layer == "swiglu"


def test_data_health_logs_skips_and_stops_past_the_bound():
    from vitreg.lit.callbacks import DataHealth

    logged = {}

    class Module:
        def log_dict(self, metrics, **kwargs):
            logged.update(metrics)

    health = DataHealth(max_skip_fraction=0.1, min_samples=20)
    health.on_train_batch_end(None, Module(), None, {"skipped": {"corrupt": 1, "shard_unreadable": 1}, "seen": 10}, 0)
    assert logged["data/skipped/corrupt"] == 1 and logged["data/skip_fraction"] == pytest.approx(0.1)
    health.on_train_batch_end(None, Module(), None, {"skipped": {}, "seen": 10}, 1)  # 1/20: fine
    with pytest.raises(RuntimeError, match=r"unusable .* above data\.webdataset\.max_skip_fraction=0\.1"):
        health.on_train_batch_end(None, Module(), None, {"skipped": {"truncated": 3}, "seen": 5}, 2)

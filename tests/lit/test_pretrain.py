"""A whole pretraining run through the real configs: files land where the summary says, metrics
are written, and a second run resumes from the first run's last checkpoint."""

from __future__ import annotations

import csv

import pytest
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from vitreg.lit.module import DINOv2Module
from vitreg.lit.pretrain import pretrain


@pytest.mark.slow
def test_run_writes_checkpoint_config_metrics_and_resumes(tmp_path):
    cfg = compose_config(
        [
            *TINY,
            "trainer.max_steps=4",
            "callbacks.checkpoint_every_n_steps=2",
            "callbacks.online_knn.enabled=true",
            "trainer.log_every_n_steps=1",
        ],
        run_dir=tmp_path / "run",
    )
    summary = pretrain(cfg)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert 0.0 <= summary["knn"]["before"]["top1_k20"] <= 100.0 and 0.0 <= summary["knn"]["after"]["top1_k20"] <= 100.0
    run = tmp_path / "run"
    assert (run / "config.yaml").read_text().count("num_register_tokens: 4") == 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert any(k.startswith("objective.teacher.backbone.register_tokens") for k in ckpt["state_dict"])
    assert "objective.dino_center.center" in ckpt["state_dict"]
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss", "lr", "val/knn_top1_k10", "val/knn_top1_k20"} <= set(rows[0])

    # the checkpoint carries its config: loading needs nothing else
    module = DINOv2Module.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert module.cfg.model.num_register_tokens == 4 and module.teacher.backbone.num_register_tokens == 4
    torch.testing.assert_close(
        module.teacher.backbone.register_tokens, ckpt["state_dict"]["objective.teacher.backbone.register_tokens"]
    )

    with open_dict(cfg):
        cfg.trainer.max_steps = 6
    resumed = pretrain(cfg)  # finds run/checkpoints/last.ckpt by itself
    assert resumed["steps"] == 6
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 6
    # the CSV history survives the restart: every step's loss once, before and after the resume
    with open(run / "logs" / "metrics.csv") as f:
        loss_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert loss_steps == list(range(6))


@pytest.mark.slow
def test_wandb_offline_run_keeps_its_id_across_restarts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(
        [*TINY, "trainer.max_steps=2", "logger=wandb", "logger.wandb.mode=offline"], run_dir=tmp_path / "run"
    )
    pretrain(cfg)
    run = tmp_path / "run"
    run_id = (run / "wandb_id.txt").read_text()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert offline and all(p.name.endswith(run_id) for p in offline)
    with open_dict(cfg):
        cfg.trainer.max_steps = 3
    pretrain(cfg)  # a requeued job: same W&B run id, resumed from last.ckpt
    assert (run / "wandb_id.txt").read_text() == run_id
    assert all(p.name.endswith(run_id) for p in (run / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_training_streams_shards_made_by_make_shards(tmp_path):
    """The user path: a folder of images -> scripts/make_shards.py's writer -> data=webdataset."""
    from tests.conftest import write_class_folders
    from vitreg.data.shards import find_images, write_shards

    folders = write_class_folders(tmp_path, 24, image_size=40, num_classes=3, seed=0)
    (sorted(folders.iterdir())[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    items, classes = find_images(tmp_path / "images")
    summary = write_shards(items, tmp_path / "shards", max_count=8, class_names=classes, progress=False)
    assert summary.images_written == 24 and len(summary.shards) == 3 and len(summary.skipped) == 1

    cfg = compose_config(
        [
            *TINY,
            "data=webdataset",
            f"data.webdataset.shards={tmp_path / 'shards'}",
            "data.batch_size_per_device=4",
            "data.num_workers=0",
            "data.webdataset.shuffle_buffer=8",
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
        ],
        run_dir=tmp_path / "run",
    )
    result = pretrain(cfg)
    assert result["steps"] == 3
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert "data/skip_fraction" in rows[0] and float(rows[-1]["data/skip_fraction"] or 0) == 0.0

"""Stopping at step N and resuming reproduces the uninterrupted run bit for bit (CPU, deterministic):
the loss terms of every later step and the final weights, through the real data path, with loader
workers and corrupt samples in the stream."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_config, write_class_folders
from vitreg.data.shards import find_images, write_shards
from vitreg.lit.pretrain import pretrain
from vitreg.lit.resume import ResumeMismatchError


class LossRecorder(L.Callback):
    """Every loss term of every optimizer step, as exact Python floats."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.steps[trainer.global_step] = metrics


def run(cfg, steps: int) -> LossRecorder:
    with open_dict(cfg):
        cfg.trainer.max_steps = steps
    recorder = LossRecorder()
    pretrain(cfg, extra_callbacks=[recorder])
    return recorder


def straight_and_resumed(overrides: list[str], tmp_path, n: int) -> tuple[dict, dict, dict, dict]:
    base = [
        *TINY,
        "trainer.deterministic=true",
        "trainer.log_every_n_steps=1",
        f"callbacks.checkpoint_every_n_steps={n}",
        "callbacks.telemetry.enabled=false",
        "model.drop_path_rate=0.2",  # stochastic depth draws from the main-process RNG: it must resume too
        *overrides,
    ]
    straight_cfg = compose_config(base, run_dir=tmp_path / "straight")
    straight = run(straight_cfg, 2 * n).steps
    resumed_cfg = compose_config(base, run_dir=tmp_path / "resumed")
    first = run(resumed_cfg, n).steps
    second = run(resumed_cfg, 2 * n).steps  # finds resumed/checkpoints/last.ckpt by itself
    weights = {}
    for name in ("straight", "resumed"):
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 2 * n
        weights[name] = ckpt["state_dict"]
    return straight, {**first, **second}, weights["straight"], weights["resumed"]


def assert_identical(straight: dict, resumed: dict, ws: dict, wr: dict, n: int) -> None:
    assert sorted(resumed) == sorted(straight) == list(range(1, 2 * n + 1))
    for step in range(1, 2 * n + 1):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]} != {straight[step]}"
    for key in ws:
        assert torch.equal(ws[key], wr[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_run_on_synthetic_shards(tmp_path, workers):
    n = 3  # odd, so with 2 workers the resumed loader must start at the second worker's stream
    straight, resumed, ws, wr = straight_and_resumed([f"data.num_workers={workers}"], tmp_path, n)
    assert_identical(straight, resumed, ws, wr, n)


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    items, classes = find_images(write_class_folders(root, 40, image_size=48, num_classes=4, seed=5))
    write_shards(items, root / "shards", max_count=8, class_names=classes, progress=False)
    return root / "shards"


def corrupt_one_sample(shards) -> None:
    first = sorted(shards.glob("*.tar"))[0]
    data = bytearray(first.read_bytes())
    at = data.find(b"\xff\xd8\xff")  # the first JPEG's header
    data[at + 200 : at + 600] = b"\x00" * 400
    first.write_bytes(bytes(data))


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_on_webdataset_shards(tmp_path, jpeg_shards):
    shards = tmp_path / "shards"
    shutil.copytree(jpeg_shards, shards)
    corrupt_one_sample(shards)  # skipped and counted; the resumed stream must skip it the same way
    overrides = [
        "data=webdataset",
        f"data.webdataset.shards={shards}",
        "data.batch_size_per_device=4",
        "data.num_workers=2",
        "data.webdataset.shuffle_buffer=6",
    ]
    n = 3
    straight, resumed, ws, wr = straight_and_resumed(overrides, tmp_path, n)
    assert_identical(straight, resumed, ws, wr, n)


@pytest.mark.slow
def test_resume_with_another_worker_count_fails_clearly_or_continues_when_allowed(tmp_path):
    base = [*TINY, "data.num_workers=0", "callbacks.checkpoint_every_n_steps=2", "callbacks.telemetry.enabled=false"]
    cfg = compose_config(base, run_dir=tmp_path / "run")
    run(cfg, 2)
    changed = compose_config([*base, "data.num_workers=2"], run_dir=tmp_path / "run")
    with pytest.raises(ResumeMismatchError, match=r"data\.num_workers.*data\.exact_resume=false"):
        run(changed, 4)
    relaxed = compose_config([*base, "data.num_workers=2", "data.exact_resume=false"], run_dir=tmp_path / "run")
    assert max(run(relaxed, 4).steps) == 4


@pytest.mark.slow
def test_the_wandb_run_id_travels_in_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = [*TINY, "logger=wandb", "callbacks.checkpoint_every_n_steps=2", "callbacks.telemetry.enabled=false"]
    cfg = compose_config(base, run_dir=tmp_path / "run")
    run(cfg, 2)
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["callbacks"]["ExactResume"]["wandb_id"] == run_id
    (tmp_path / "run" / "wandb_id.txt").unlink()  # e.g. a checkpoint copied into a fresh run dir
    run(cfg, 3)
    assert (tmp_path / "run" / "wandb_id.txt").read_text() == run_id

"""Crashes and damage: kill -9 during a checkpoint write or mid-training, and a corrupted last.ckpt."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from vitreg.lit.checkpointing import AtomicCheckpointIO, newest_good_checkpoint, readable
from vitreg.lit.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.02)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    writer = textwrap.dedent(
        f"""
        import torch
        from vitreg.lit.checkpointing import AtomicCheckpointIO
        big = {{"state_dict": {{f"w{{i}}": torch.randn(4_000_000) for i in range(40)}}, "global_step": 2}}
        AtomicCheckpointIO().save_checkpoint(big, {str(target)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=REPO)
    try:
        temporary = lambda: [p for p in tmp_path.glob(".last.ckpt.*.tmp") if p.stat().st_size > 1_000_000]  # noqa: E731
        wait_for(lambda: temporary() or proc.poll() is not None, 120, "the checkpoint write to start")
        assert proc.poll() is None, "the writer finished before it could be killed; make the checkpoint bigger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert readable(target) is None
    assert torch.load(target, weights_only=True)["global_step"] == 1  # the previous checkpoint, intact
    assert newest_good_checkpoint(tmp_path) == target  # the leftover hidden temporary file is ignored


@pytest.mark.slow
def test_corrupted_last_checkpoint_falls_back_to_the_newest_good_one(tmp_path, caplog):
    run = tmp_path / "run"
    cfg = compose_config([*TINY, "trainer.max_steps=4", "callbacks.checkpoint_every_n_steps=2"], run_dir=run)
    pretrain(cfg)
    ckpts = run / "checkpoints"
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"last.ckpt", "step0000002.ckpt", "step0000004.ckpt"}
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])  # a truncated file
    (ckpts / "step0000004.ckpt").write_bytes(b"garbage")
    with open_dict(cfg):
        cfg.trainer.max_steps = 5
    with caplog.at_level(logging.WARNING):
        summary = pretrain(cfg)
    assert summary["steps"] == 5
    messages = caplog.text
    assert "last.ckpt is unreadable" in messages and "falling back to" in messages and "step0000002.ckpt" in messages


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "step0000002.ckpt").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"no readable checkpoint in .*ckpt_path="):
        newest_good_checkpoint(tmp_path)
    assert newest_good_checkpoint(tmp_path / "empty") is None  # no checkpoints: a fresh run


def cli_overrides(output_root: Path, steps: int) -> list[str]:
    return [
        *TINY,
        f"trainer.max_steps={steps}",
        "callbacks.checkpoint_every_n_steps=2",
        "callbacks.telemetry.every_n_steps=1",
        "trainer.log_every_n_steps=1",
        f"paths.output_root={output_root}",
        "paths.cache_dir=/tmp/vitreg-test-cache",
        "run_name=killed",
    ]


@pytest.mark.slow
def test_kill_9_mid_training_then_restart_continues_from_the_last_checkpoint(tmp_path):
    command = [sys.executable, str(REPO / "train" / "pretrain.py"), *cli_overrides(tmp_path, 40)]
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ckpt.exists() or proc.poll() is not None, 240, "the first checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= killed_at < 40
    restarted = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resuming from" in restarted.stderr + restarted.stdout
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 40
    # the restart measured telemetry from the checkpoint's step on, not from 0 again
    from vitreg.telemetry.store import read_records

    steps = [r["step"] for r in read_records(tmp_path / "killed")]
    assert steps[-1] == 40 and set(range(killed_at, 41)) <= set(steps)
    # the CSV history survives: rows logged after the checkpoint, before the kill, were dropped and redone
    import csv

    with open(tmp_path / "killed" / "logs" / "metrics.csv") as f:
        loss_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 39  # each step at most once, in order
    # rows are flushed at every step; only the row of the step just before the checkpoint can be lost,
    # when the kill lands between writing the checkpoint and logging that step's metrics
    assert set(range(40)) - set(loss_steps) <= {killed_at - 1}


@pytest.mark.slow
def test_resume_never_starts_afresh_in_a_run_dir_with_checkpoints(tmp_path, caplog):
    base = [*TINY, "callbacks.checkpoint_every_n_steps=2", "callbacks.telemetry.enabled=false"]
    assert pretrain(compose_config([*base, "trainer.max_steps=2"], run_dir=tmp_path / "run"))["steps"] == 2
    with caplog.at_level(logging.WARNING):
        fresh = pretrain(compose_config([*base, "trainer.max_steps=1", "resume=never"], run_dir=tmp_path / "run"))
    assert fresh["steps"] == 1  # from step 0, not from the checkpoint at step 2
    assert "resume=never: starting afresh" in caplog.text

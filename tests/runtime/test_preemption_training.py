"""PreemptionHandler inside real (tiny, CPU) training runs: a signal mid-run writes last.ckpt,
requeues once under SLURM (scontrol is faked), stops training early, and the process carries on;
the next start resumes from that checkpoint and continues the same W&B run."""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from vitreg.lit.pretrain import pretrain
from vitreg.runtime import signals as sig

MAX_STEPS = 50
SIGNAL_AT = 3


class SendSignal(L.Callback):
    """Sends ``signum`` to this process once, at the end of optimizer step ``at``."""

    def __init__(self, signum: int, at: int = SIGNAL_AT) -> None:
        self.signum, self.at, self.sent = signum, at, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class StartStep(L.Callback):
    """Records the global step training (re)starts at."""

    step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


@pytest.fixture
def scontrol_calls(monkeypatch):
    """Records `scontrol ...` commands instead of running them; other commands run for real."""
    calls: list[list[str]] = []
    real_run = subprocess.run

    def fake_run(cmd, *args, **kwargs):
        if isinstance(cmd, (list, tuple)) and cmd and cmd[0] == "scontrol":
            calls.append(list(cmd))
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(sig.subprocess, "run", fake_run)
    return calls


def tiny(tmp_path, *extra: str):
    return compose_config(
        [*TINY, f"trainer.max_steps={MAX_STEPS}", "callbacks.checkpoint_every_n_steps=1000", "logger=csv", *extra],
        run_dir=tmp_path / "run",
    )


def saved_step(cfg) -> int:
    ckpt = torch.load(f"{cfg.paths.run_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_mid_run_checkpoints_requeues_once_and_stops(tmp_path, monkeypatch, scontrol_calls, signum, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    handlers_before = signal.getsignal(signum)
    cfg = tiny(tmp_path)
    summary = pretrain(cfg, extra_callbacks=[SendSignal(signum)])  # returns: the process carries on
    assert summary["steps"] in (SIGNAL_AT, SIGNAL_AT + 1)  # stopped early (of 50), at the next batch end
    assert saved_step(cfg) == summary["steps"]
    assert scontrol_calls == [["scontrol", "requeue", "4242"]]
    assert signal.getsignal(signum) == handlers_before
    assert f"{signum.name}; saving" in caplog.text and "requeued" in caplog.text


@pytest.mark.slow
def test_without_slurm_no_requeue_but_checkpoint_and_resume(tmp_path, scontrol_calls):
    cfg = tiny(tmp_path)
    stopped = pretrain(cfg, extra_callbacks=[SendSignal(signal.SIGUSR1)])["steps"]
    assert stopped < MAX_STEPS and saved_step(cfg) == stopped
    assert scontrol_calls == []
    with open_dict(cfg):
        cfg.trainer.max_steps = stopped + 2
    start = StartStep()
    assert pretrain(cfg, extra_callbacks=[start])["steps"] == stopped + 2
    assert start.step == stopped  # a restart continues from the preemption checkpoint


@pytest.mark.slow
def test_requeued_array_task_resumes_the_same_wandb_run(tmp_path, monkeypatch, scontrol_calls):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key, value in {"SLURM_JOB_ID": "31", "SLURM_ARRAY_JOB_ID": "30", "SLURM_ARRAY_TASK_ID": "1"}.items():
        monkeypatch.setenv(key, value)
    cfg = tiny(tmp_path, "logger=wandb", "logger.wandb.mode=offline")
    stopped = pretrain(cfg, extra_callbacks=[SendSignal(signal.SIGUSR1)])["steps"]
    assert scontrol_calls == [["scontrol", "requeue", "30_1"]]
    run = tmp_path / "run"
    run_id = (run / "wandb_id.txt").read_text().strip()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued task: same ids, same run dir
    with open_dict(cfg):
        cfg.trainer.max_steps = stopped + 2
    start = StartStep()
    assert pretrain(cfg, extra_callbacks=[start])["steps"] == stopped + 2
    assert start.step == stopped
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    assert len(scontrol_calls) == 1


@pytest.mark.slow
def test_runtime_signals_empty_leaves_signals_alone(tmp_path):
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(signal.getsignal(signal.SIGUSR1))

    cfg = tiny(tmp_path, "runtime.signals=[]", "trainer.max_steps=2")
    before = signal.getsignal(signal.SIGUSR1)
    assert pretrain(cfg, extra_callbacks=[Probe()])["steps"] == 2
    assert seen and all(h == before for h in seen)


@pytest.mark.slow
def test_ctrl_c_saves_last_ckpt_and_stops_without_requeue(tmp_path, monkeypatch, scontrol_calls):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = tiny(tmp_path)
    summary = pretrain(cfg, extra_callbacks=[SendSignal(signal.SIGINT)])  # no KeyboardInterrupt escapes
    assert summary["steps"] in (SIGNAL_AT, SIGNAL_AT + 1) and saved_step(cfg) == summary["steps"]
    assert scontrol_calls == []  # the user stopped it: not requeued
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

"""PreemptionHandler's flow against a stand-in trainer (fast), and its helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import warnings

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from vitreg.runtime import signals as sig
from vitreg.runtime.signals import PreemptionHandler, parse_signal, requeue_job_id, slurm_plugins


class FakeStrategy:
    def __init__(self, others_signalled: bool = False) -> None:
        self.others_signalled = others_signalled  # what the other ranks contribute to the all-reduce
        self.reductions = 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        assert all is False  # "any rank" (MAX), not "every rank"
        self.reductions += 1
        return decision or self.others_signalled


class FakeTrainer:
    def __init__(self, rank: int = 0, others_signalled: bool = False) -> None:
        self.global_rank = rank
        self.is_global_zero = rank == 0
        self.global_step = 0
        self.should_stop = False
        self.strategy = FakeStrategy(others_signalled)
        self.saved: list[tuple[str, int]] = []

    def save_checkpoint(self, path: str) -> None:
        self.saved.append((path, self.global_step))


def make_handler(tmp_path, env, **kw):
    calls: list[str] = []

    def fake_requeue(job_id: str) -> bool:
        calls.append(job_id)
        return True

    handler = PreemptionHandler(tmp_path / "last.ckpt", env=env, requeue_fn=fake_requeue, **kw)
    return handler, calls


def run_steps(handler, trainer, steps, signal_at=None, signum=signal.SIGUSR1):
    handler.on_train_start(trainer, None)
    try:
        for step in range(1, steps + 1):
            trainer.global_step = step
            if step == signal_at:
                os.kill(os.getpid(), signum)
            handler.on_train_batch_end(trainer, None, None, None, step - 1)
            if trainer.should_stop:
                break
    finally:
        handler.teardown(trainer, None, "fit")


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_requeues_once_and_stops(tmp_path, signum):
    before = signal.getsignal(signum)
    handler, calls = make_handler(tmp_path, {"SLURM_JOB_ID": "42"})
    trainer = FakeTrainer()
    run_steps(handler, trainer, 10, signal_at=3, signum=signum)
    assert trainer.saved == [(str(tmp_path / "last.ckpt"), 3)]
    assert calls == ["42"] and handler.requeued_job == "42"
    assert trainer.should_stop and handler.preempted and handler.stopped_at_step == 3
    assert signal.getsignal(signum) == before  # restored after training


def test_array_task_requeues_array_id_and_only_once(tmp_path):
    env = {"SLURM_JOB_ID": "51", "SLURM_ARRAY_JOB_ID": "50", "SLURM_ARRAY_TASK_ID": "1"}
    handler, calls = make_handler(tmp_path, env)
    trainer = FakeTrainer()
    run_steps(handler, trainer, 10, signal_at=2)
    # a second signal (SLURM's SIGTERM after the requeue) and more batches change nothing
    handler.on_train_start(trainer, None)
    os.kill(os.getpid(), signal.SIGTERM)
    handler.on_train_batch_end(trainer, None, None, None, 5)
    handler.teardown(trainer, None, "fit")
    assert calls == ["50_1"] and len(trainer.saved) == 1


def test_no_slurm_no_requeue_but_checkpoint(tmp_path, caplog):
    handler, calls = make_handler(tmp_path, {})
    trainer = FakeTrainer()
    run_steps(handler, trainer, 10, signal_at=4)
    assert calls == [] and trainer.saved == [(str(tmp_path / "last.ckpt"), 4)] and trainer.should_stop
    assert "not running under SLURM" in caplog.text


def test_requeue_disabled_by_config(tmp_path, caplog):
    handler, calls = make_handler(tmp_path, {"SLURM_JOB_ID": "7"}, requeue=False)
    trainer = FakeTrainer()
    run_steps(handler, trainer, 10, signal_at=1)
    assert calls == [] and len(trainer.saved) == 1 and trainer.should_stop
    assert "runtime.requeue=false" in caplog.text


def test_signal_on_another_rank_stops_this_one_without_requeue_on_rank_1(tmp_path):
    handler, calls = make_handler(tmp_path, {"SLURM_JOB_ID": "7"})
    trainer = FakeTrainer(rank=1, others_signalled=True)  # rank 0 got SIGUSR1, this rank did not
    run_steps(handler, trainer, 10)
    assert trainer.saved == [(str(tmp_path / "last.ckpt"), 1)] and trainer.should_stop
    assert calls == []  # only global rank 0 requeues


def test_no_signal_no_action_and_one_reduction_per_batch(tmp_path):
    handler, calls = make_handler(tmp_path, {"SLURM_JOB_ID": "7"})
    trainer = FakeTrainer()
    run_steps(handler, trainer, 5)
    assert trainer.saved == [] and calls == [] and not trainer.should_stop
    assert trainer.strategy.reductions == 5


def test_disabled_handler_installs_nothing(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    handler, _ = make_handler(tmp_path, {}, signals=[], save_on_interrupt=False)
    trainer = FakeTrainer()
    handler.on_train_start(trainer, None)
    assert signal.getsignal(signal.SIGUSR1) == before
    handler.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.strategy.reductions == 0


def test_ctrl_c_saves_and_stops_without_requeue(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    handler, calls = make_handler(tmp_path, {"SLURM_JOB_ID": "42"}, signals=[])  # Ctrl-C needs no preemption list
    trainer = FakeTrainer()
    run_steps(handler, trainer, 10, signal_at=4, signum=signal.SIGINT)  # no KeyboardInterrupt reaches the loop
    assert trainer.saved == [(str(tmp_path / "last.ckpt"), 4)]
    assert trainer.should_stop and calls == []  # the user stopped it: never requeued
    assert signal.getsignal(signal.SIGINT) == before


def test_second_ctrl_c_interrupts_at_once(tmp_path):
    handler, _ = make_handler(tmp_path, {})
    handler._on_signal(signal.SIGINT, None)  # the first is only recorded
    with pytest.raises(KeyboardInterrupt):
        handler._on_signal(signal.SIGINT, None)


def test_handler_only_records_the_signal(tmp_path):
    handler, _ = make_handler(tmp_path, {})
    handler._on_signal(signal.SIGUSR1, None)
    assert handler._received == [signal.SIGUSR1] and not handler.preempted


def test_parse_signal_and_job_ids():
    assert parse_signal("SIGUSR1") is parse_signal("usr1") is parse_signal(10) is signal.SIGUSR1
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("SIGNOPE")
    assert requeue_job_id({}) is None
    assert requeue_job_id({"SLURM_ARRAY_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "2"}) is None  # not in a job
    assert requeue_job_id({"SLURM_JOB_ID": "9"}) == "9"
    assert requeue_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "0"}) == "8_0"


def test_scontrol_requeue_reports_success_and_failure(monkeypatch, caplog):
    runs = []

    def fake_run(cmd, **kw):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 0 if cmd[-1] == "1" else 1, "", "Invalid job id specified")

    monkeypatch.setattr(sig.subprocess, "run", fake_run)
    assert sig.scontrol_requeue("1") is True
    assert sig.scontrol_requeue("2") is False and "Invalid job id" in caplog.text
    assert runs == [["scontrol", "requeue", "1"], ["scontrol", "requeue", "2"]]

    def missing(cmd, **kw):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(sig.subprocess, "run", missing)
    assert sig.scontrol_requeue("3") is False


def test_slurm_plugins_turn_off_lightnings_auto_requeue():
    assert slurm_plugins(environment_detected=False) == []
    (env,) = slurm_plugins(environment_detected=True)
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    with warnings.catch_warnings():  # "srun is available but not used" where SLURM is installed
        warnings.simplefilter("ignore")
        assert slurm_plugins() == []  # no SLURM variables in this test

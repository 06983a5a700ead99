"""Preemption: checkpoint, requeue and stop when SLURM (or anyone) asks the run to end.

``PreemptionHandler`` is the *one* owner of requeueing (Lightning's own SLURM auto-requeue is
switched off by ``slurm_plugins``; under ``hydra/launcher=submitit_slurm`` submitit's is off and its USR2
never sent, see conf/hydra/launcher/submitit_slurm.yaml). The flow:

1. SIGUSR1 (``sbatch --signal=USR1@N``, ``scancel --signal=USR1``) or SIGTERM (the time limit,
   ``scancel``) arrives. The handler only records it: Python runs signal handlers between
   bytecodes of the main thread, wherever it happens to be, so it takes no lock, does no I/O and
   no collective.
2. At the next ``on_train_batch_end`` every rank asks whether *any* rank got a signal (an
   all-reduce under DDP/FSDP; srun signals every task, but ``kill`` may reach only one).
3. All ranks save ``<run_dir>/checkpoints/last.ckpt`` with ``trainer.save_checkpoint`` (a
   collective for sharded strategies), the file the next start resumes from.
4. Global rank 0 requeues the job once with ``scontrol requeue <id>`` (``<array job>_<task>`` for
   array tasks), when running under SLURM and ``runtime.requeue`` is on.
5. ``trainer.should_stop = True``: training ends after this batch and ``trainer.fit`` returns
   normally. Requeueing a running job makes SLURM terminate it: its SIGTERM is only recorded while
   the trainer winds down; one that arrives after the trainer's teardown ends the process, which
   is harmless then (checkpoint written, job requeued). Without SLURM nothing follows and the
   process exits 0. The requeued job finds ``last.ckpt`` and the W&B id in the same run directory.

Ctrl-C (SIGINT) takes the same path, without the requeue: the first one saves ``last.ckpt`` at the end of
the current batch and stops; a second one stops at once (``KeyboardInterrupt``, Lightning's shutdown).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")
REQUEUE_TIMEOUT_S = 60


def parse_signal(name: str | int | signal.Signals) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"``, ``10`` or ``signal.SIGUSR1`` -> ``signal.SIGUSR1``."""
    if isinstance(name, signal.Signals):
        return name
    if isinstance(name, int):
        return signal.Signals(name)
    key = str(name).strip().upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use e.g. SIGUSR1, SIGUSR2 or SIGTERM") from None


def requeue_job_id(env: Mapping[str, str]) -> str | None:
    """The id ``scontrol requeue`` needs: ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`` for an
    array task (requeueing ``SLURM_JOB_ID`` would also work, but this is what squeue shows), else
    ``SLURM_JOB_ID``; None outside SLURM."""
    if not env.get("SLURM_JOB_ID"):
        return None
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env["SLURM_JOB_ID"]


def scontrol_requeue(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; True when SLURM accepted it. Failures are logged, never raised:
    the checkpoint is already written, so a failed requeue only means a manual resubmit."""
    cmd = ["scontrol", "requeue", job_id]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        log.error("requeue: `%s` failed to run: %s; resubmit the job by hand", " ".join(cmd), err)
        return False
    if result.returncode != 0:
        log.error(
            "requeue: `%s` exited with %d: %s; resubmit the job by hand",
            " ".join(cmd),
            result.returncode,
            (result.stderr or result.stdout or "").strip(),
        )
        return False
    log.warning("requeue: SLURM job %s requeued (`%s`)", job_id, " ".join(cmd))
    return True


def slurm_plugins(environment_detected: bool | None = None) -> list[Any]:
    """The Trainer plugins that make ``PreemptionHandler`` the only requeue owner: under SLURM a
    ``SLURMEnvironment(auto_requeue=False)`` (Lightning would otherwise install its own SIGUSR1
    handler, save an ``hpc_ckpt_*.ckpt`` and requeue as well); outside SLURM nothing."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    detected = SLURMEnvironment.detect() if environment_detected is None else environment_detected
    return [SLURMEnvironment(auto_requeue=False)] if detected else []


class PreemptionHandler(L.Callback):
    """Checkpoint, requeue (once) and stop on a preemption signal; see the module docstring.

    Args:
        checkpoint_path: where to save, normally ``<run_dir>/checkpoints/last.ckpt``.
        signals: the signals to handle (names or numbers); empty disables the handler.
        requeue: requeue the SLURM job (only when ``SLURM_JOB_ID`` is set).
        env: the environment to read SLURM ids from (default ``os.environ``, read when needed).
        requeue_fn: ``job_id -> bool``; default ``scontrol_requeue``. Tests inject a fake.
        save_on_interrupt: handle Ctrl-C (SIGINT) too: save and stop, never requeue; a second Ctrl-C
            interrupts at once.
    """

    def __init__(
        self,
        checkpoint_path: str | Path,
        signals: Iterable[str | int | signal.Signals] = DEFAULT_SIGNALS,
        requeue: bool = True,
        env: Mapping[str, str] | None = None,
        requeue_fn: Callable[[str], bool] | None = None,
        save_on_interrupt: bool = True,
    ) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signals: tuple[signal.Signals, ...] = tuple(dict.fromkeys(parse_signal(s) for s in signals))
        self.save_on_interrupt = save_on_interrupt
        self.requeue = requeue
        self._env = env
        self._requeue_fn = requeue_fn or scontrol_requeue
        self._previous: dict[signal.Signals, Any] = {}
        # Written by the signal handler (plain attribute stores only), read at batch end.
        self._received: list[int] = []
        # Results, for logs and tests.
        self.preempted = False  # a checkpoint was saved because of a signal and training stopped
        self.stopped_at_step: int | None = None
        self.requeued_job: str | None = None
        self.requeue_attempts = 0

    # ---------------------------------------------------------------------------- signal handling
    @property
    def env(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    @property
    def handled(self) -> tuple[signal.Signals, ...]:
        """Every signal this handler takes over: the preemption signals, and SIGINT when saving on Ctrl-C."""
        extra = (signal.SIGINT,) if self.save_on_interrupt and signal.SIGINT not in self.signals else ()
        return self.signals + extra

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Async-signal context: record and return. list.append is atomic under the GIL.
        if signum == signal.SIGINT and signal.SIGINT in self._received:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, as Python's own handler would
        self._received.append(signum)

    def _install(self) -> None:
        if not self.handled:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: not in the main thread; signals %s are not handled", self._names(self.handled))
            return
        for signum in self.handled:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:  # a bound method compares equal, not identical
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @staticmethod
    def _names(signums: Sequence[int]) -> str:
        return ", ".join(signal.Signals(s).name for s in signums) or "none"

    # ---------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own signal registration (which happens between on_fit_start and the
        # fit loop), so these handlers replace Lightning's SIGTERM handler for the training loop:
        # Lightning's would raise SIGTERMException after this batch (exit without a clean stop).
        self._received.clear()
        self._install()
        if trainer.is_global_zero and self.handled:
            env = self.env
            where = (
                f"SLURM job {requeue_job_id(env)} (restart {env.get('SLURM_RESTART_COUNT', '0')})"
                if env.get("SLURM_JOB_ID")
                else "not under SLURM"
            )
            log.info(
                "preemption: %s handled at global step %d, %s; requeue %s",
                self._names(self.handled),
                trainer.global_step,
                where,
                "on" if self.requeue and env.get("SLURM_JOB_ID") else "off",
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.handled or self.preempted:
            return
        # Every rank takes part in the reduction at every batch, so all agree when to stop.
        if not trainer.strategy.reduce_boolean_decision(bool(self._received), all=False):
            return
        self._preempt(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The handlers stay installed until the trainer's own teardown, which puts back the handlers
        # from before fit (it runs just before this hook), so a SIGTERM from SLURM while the loop
        # winds down after a requeue is only recorded. This restore is a fallback for other paths.
        self._restore()
        late = self._received[1:] if self.preempted else []
        if late and trainer.is_global_zero:
            log.info("preemption: %s received while stopping; ignored", self._names(late))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    # ------------------------------------------------------------------------------- preempt
    def _preempt(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        rank = trainer.global_rank
        got = self._names(self._received[:1]) if self._received else "a signal on another rank"
        if self._received[:1] == [signal.SIGINT]:
            got += " (Ctrl-C; press it again to stop without saving)"
        log.warning(
            "preemption: rank %d: %s; saving %s at global step %d and stopping", rank, got, self.checkpoint_path, step
        )
        trainer.save_checkpoint(str(self.checkpoint_path))
        if trainer.is_global_zero:
            log.warning("preemption: saved checkpoint at global step %d to %s", step, self.checkpoint_path)
            if self._received and all(s == signal.SIGINT for s in self._received):
                log.warning("preemption: interrupted with Ctrl-C; not requeueing")
            else:
                self._maybe_requeue()
        self.preempted = True
        self.stopped_at_step = step
        trainer.should_stop = True

    def _maybe_requeue(self) -> None:
        job_id = requeue_job_id(self.env)
        if job_id is None:
            log.warning("preemption: not running under SLURM (no SLURM_JOB_ID); not requeueing")
            return
        if not self.requeue:
            log.warning("preemption: runtime.requeue=false; not requeueing SLURM job %s", job_id)
            return
        if self.requeue_attempts:
            return  # once per run, whatever happens
        self.requeue_attempts += 1
        log.warning("preemption: requeueing SLURM job %s", job_id)
        if self._requeue_fn(job_id):
            self.requeued_job = job_id


__all__ = ["PreemptionHandler", "parse_signal", "requeue_job_id", "scontrol_requeue", "slurm_plugins"]

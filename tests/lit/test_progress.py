"""Speed users can see: perf/* metrics in every logger, one progress line per N steps off a terminal
(no tqdm ``\\r``), and neither adds a host sync on steps that do not log."""

from __future__ import annotations

import csv
import importlib.util
import re
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

import vitreg.lit.perf as perf_module
from tests.conftest import TINY, compose_config
from vitreg.lit.perf import PerfMonitor
from vitreg.lit.pretrain import pretrain
from vitreg.lit.progress import LineProgress, progress_line, progress_mode
from vitreg.utils.clock import format_duration

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r"^step (\d+)/(\d+)  loss (\S+)  lr (\S+)  (\S+) s/step  (\S+) img/s  data (\S+)  mem (\S+) GiB  eta (\S+)$"
)


def tiny(tmp_path, *overrides):
    return compose_config([*TINY, *overrides], run_dir=tmp_path / "run")


class SlowBetweenSteps(L.Callback):
    """Sleeps after each step (after PerfMonitor's end mark): time the device spends between steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class Callbacks(L.Callback):
    """Keeps the trainer's callbacks (which progress callback Lightning ended up with)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen = list(trainer.callbacks)


@pytest.mark.slow
def test_perf_metrics_reach_the_csv_every_n_steps(tmp_path):
    pause = 0.2
    summary = pretrain(
        tiny(tmp_path, "trainer.max_steps=6", "trainer.log_every_n_steps=2"),
        extra_callbacks=[SlowBetweenSteps(pause)],
    )
    with open(f"{summary['logs']}/metrics.csv") as f:
        every = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in every]
    assert steps == sorted(set(steps))  # one row per step: perf/* share the losses' row
    rows = [r for r in every if r.get("perf/step_s")]
    assert all(r["train/loss"] for r in rows)
    # logging steps 2, 4, 6; the first window only opens (step 1 is warm-up), each later one is read a
    # step late: rows at the 0-based steps of the batches logged at global steps 4 and 6
    assert [int(r["step"]) for r in rows] == [3, 5]
    for r in rows:
        step_s = float(r["perf/step_s"])
        assert step_s > 0
        assert float(r["perf/img_per_s"]) == pytest.approx(4 / step_s, rel=1e-6)  # batch 4, one device
        assert float(r["perf/img_per_s_per_device"]) == pytest.approx(float(r["perf/img_per_s"]))
        wait = float(r["perf/data_wait_frac"])
        assert 0.0 <= wait <= 1.0
        assert wait >= 0.9 * pause / step_s  # every step was followed by the pause
        assert float(r["perf/peak_mem_gib"]) > 0
        assert "perf/mfu" not in r or not r["perf/mfu"]  # no FLOPs figure, no device peak on CPU


def lines_cfg(tmp_path):
    """Six steps, a progress line every third, in lines mode."""
    return tiny(
        tmp_path,
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=3",
        "trainer.enable_progress_bar=true",
        "trainer.progress=lines",
    )


@pytest.mark.slow
def test_lines_mode_prints_one_line_per_n_steps_and_no_carriage_return(tmp_path, capfd):
    watch = Callbacks()
    pretrain(
        lines_cfg(tmp_path),
        extra_callbacks=[watch],
    )
    out, err = capfd.readouterr()
    assert "\r" not in out and "\r" not in err
    assert not any(isinstance(c, TQDMProgressBar) for c in watch.seen)
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [(int(m[1]), int(m[2])) for m in matches] == [(3, 6), (6, 6)]  # every 3 steps
    for m in matches:
        assert float(m[3]) > 0 and float(m[4]) > 0  # loss, lr
        assert float(m[8]) > 0  # peak memory
    assert float(matches[1][5]) > 0 and float(matches[1][6]) > 0  # s/step, img/s once a window is read
    assert matches[-1][9] == "0:00:00"  # nothing left at the last step


def test_progress_line_format():
    perf = {
        "perf/step_s": 0.512,
        "perf/img_per_s": 62.5,
        "perf/data_wait_frac": 0.0123,
        "perf/peak_mem_gib": 12.34,
    }
    assert progress_line(120, 125000, 11.07312, 2e-5, perf) == (
        "step 120/125000  loss 11.0731  lr 2.00e-05  0.512 s/step  62.5 img/s  data 1.2%  mem 12.3 GiB  eta 17:45:39"
    )
    assert progress_line(1, 10, None, None, {}) == "step 1/10  loss -  lr -  - s/step  - img/s  data -  eta -"


@pytest.mark.parametrize(("isatty", "mode"), [(True, "bar"), (False, "lines")])
def test_auto_mode_is_a_bar_on_a_terminal_and_lines_otherwise(monkeypatch, isatty, mode):
    monkeypatch.setattr("sys.stdout.isatty", lambda: isatty)
    assert progress_mode("auto") == mode
    assert progress_mode("bar") == "bar" and progress_mode("lines") == "lines"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("isatty", "enabled", "progress"),
    [(True, True, TQDMProgressBar), (False, True, LineProgress), (False, False, None)],
)
def test_pretrain_picks_the_progress_callback(tmp_path, monkeypatch, isatty, enabled, progress):
    monkeypatch.setattr("sys.stdout.isatty", lambda: isatty)
    watch = Callbacks()
    pretrain(
        tiny(tmp_path, "trainer.max_steps=1", f"trainer.enable_progress_bar={str(enabled).lower()}"),
        extra_callbacks=[watch],
    )
    bars = [type(c) for c in watch.seen if isinstance(c, (TQDMProgressBar, LineProgress))]
    assert bars == ([progress] if progress else [])  # enable_progress_bar=false: neither bar nor lines


class HostSyncs(TorchFunctionMode):
    """Counts the calls that make the host wait for the device, and tensors made on a device from
    Python values (a blocking copy)."""

    SYNCING = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "nonzero", "cpu", "numpy"})
    FACTORIES = frozenset({"tensor", "as_tensor", "full", "scalar_tensor"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCING or (name in self.FACTORIES and (kwargs or {}).get("device") is not None):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
def test_no_host_sync_from_these_callbacks_on_steps_that_do_not_log(tmp_path, monkeypatch):
    syncs: dict[tuple[str, int], Counter] = {}

    def counted(cls, hook):
        real = getattr(cls, hook)

        def wrapper(self, trainer, *args, **kwargs):
            with HostSyncs() as mode:
                result = real(self, trainer, *args, **kwargs)
            syncs.setdefault((f"{cls.__name__}.{hook}", trainer.global_step), Counter()).update(mode.calls)
            return result

        monkeypatch.setattr(cls, hook, wrapper)

    for cls, hook in [
        (PerfMonitor, "on_train_batch_start"),
        (PerfMonitor, "on_train_batch_end"),
        (LineProgress, "on_train_batch_end"),
    ]:
        counted(cls, hook)
    pretrain(lines_cfg(tmp_path))
    # batch start sees global_step 0..5, batch end 1..6 (the step is counted by then); steps 3, 6 log
    assert len(syncs) == 18
    for (hook, step), calls in syncs.items():
        logging = hook.endswith("on_train_batch_end") and step % 3 == 0
        if not logging:
            assert sum(calls.values()) == 0, (hook, step, calls)
    assert sum(syncs[("LineProgress.on_train_batch_end", 3)].values()) > 0  # the counter sees the loss read


@pytest.mark.slow
def test_mfu_is_logged_given_the_flops_per_image_and_a_device_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(perf_module, "peak_flops", lambda device: 1e12)
    monitor = PerfMonitor(images_per_step=4, flops_per_image=2e9)
    pretrain(tiny(tmp_path, "trainer.max_steps=3", "trainer.log_every_n_steps=1"), extra_callbacks=[monitor])
    per_device = monitor.latest["perf/img_per_s_per_device"]
    assert monitor.latest["perf/mfu"] == pytest.approx(per_device * 2e9 / 1e12)


def test_modules_import_without_a_gpu():
    assert perf_module.peak_flops(torch.device("cpu")) is None
    assert format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2 days, 3:04:05"


def test_cli_prints_the_run_summary_on_rank_zero_only(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("train_pretrain_cli", ROOT / "train" / "pretrain.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    hydra = SimpleNamespace(get=lambda: SimpleNamespace(runtime=SimpleNamespace(output_dir="/runs/x")))
    monkeypatch.setattr(cli, "HydraConfig", hydra)
    summary = {"run_dir": "/runs/x", "config": "c", "checkpoint": "k", "logs": "l", "steps": 2, "skipped_steps": 0}
    monkeypatch.setattr(cli, "pretrain", lambda cfg: summary)
    printed = {}
    for rank_zero in (True, False):
        monkeypatch.setattr(cli, "is_global_zero_process", lambda rank_zero=rank_zero: rank_zero, raising=False)
        cli.main.__wrapped__(OmegaConf.create({"paths": {"run_dir": None}}))
        printed[rank_zero] = capsys.readouterr().out
    assert "run directory: /runs/x" in printed[True]
    assert printed[False] == ""


@pytest.mark.slow
def test_perf_metrics_reach_wandb_at_the_step_of_the_losses(tmp_path, monkeypatch):
    from tests.wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny(
        tmp_path, "trainer.max_steps=4", "trainer.log_every_n_steps=2", "logger=wandb", "logger.wandb.mode=offline"
    )
    pretrain(cfg)
    rows = read_offline_run(tmp_path / "run")["history"]
    perf_steps = [r["trainer/global_step"] for r in rows if "perf/step_s" in r]
    loss_steps = {r["trainer/global_step"] for r in rows if "train/loss" in r}
    assert perf_steps == [3] and 3 in loss_steps
    (row,) = [r for r in rows if "perf/step_s" in r]
    assert row["perf/img_per_s"] == pytest.approx(4 / row["perf/step_s"])

"""Cost of the artifact-telemetry callback: training step time with and without it, in one process.

Two short pretraining runs on the same config (default: the CPU demo), one with
``callbacks.telemetry.enabled=true`` and one without, each timed from the first to the last training
batch (set-up and the step-0 compilation of anything lazy excluded by a warm-up of a few steps).
Printed:

- the mean step time without telemetry (the baseline) and with it;
- the time of one measurement (probe forward + statistics + files, and W&B media when
  ``--wandb``), taken from the callback itself;
- the overhead at the configured cadence: measurement time / (every_n_steps x baseline step time);
- the end-to-end ratio of the two runs' training times (noisier: it includes run-to-run jitter).

    python benchmarks/bench_telemetry.py                       # demo config, 60 steps, cadence 50
    python benchmarks/bench_telemetry.py --wandb               # + W&B offline media (images, histograms)
    python benchmarks/bench_telemetry.py --steps 100 -- model=vitb callbacks.telemetry.every_n_steps=500
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from vitreg.config import register_configs
from vitreg.lit.pretrain import pretrain

CONF = Path(__file__).resolve().parents[1] / "conf"


class StepTimer(L.Callback):
    """Wall time of each training batch (start to start), after ``warmup`` batches."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step >= self.warmup:
            self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, module) -> None:
        self.stamps.append(time.perf_counter())

    @property
    def total(self) -> float:
        return self.stamps[-1] - self.stamps[0]

    @property
    def steps(self) -> int:
        return len(self.stamps) - 1


def run(overrides: list[str], run_dir: Path, warmup: int) -> tuple[StepTimer, dict]:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    timer = StepTimer(warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = pretrain(cfg, extra_callbacks=[timer])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return timer, {**summary, "cfg": cfg, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--wandb", action="store_true", help="log to W&B (offline) so media are drawn too")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=demo)")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.wandb:
        os.environ["WANDB_MODE"] = "offline"
    experiment = [] if any(o.startswith("experiment=") for o in args.overrides) else ["experiment=demo"]
    base = [
        *experiment,
        *args.overrides,
        f"trainer.max_steps={args.steps}",
        "callbacks.online_knn.enabled=false",
        "trainer.enable_progress_bar=false",
        "callbacks.checkpoint_every_n_steps=100000",
        f"logger={'wandb' if args.wandb else 'none'}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        off, _ = run([*base, "callbacks.telemetry.enabled=false"], Path(tmp) / "off", args.warmup)
        on, summary = run([*base, "callbacks.telemetry.enabled=true"], Path(tmp) / "on", args.warmup)
    t = summary["cfg"].callbacks.telemetry
    measurements = summary["telemetry_measurements"]
    step_off = off.total / off.steps
    step_on = on.total / on.steps
    per_measurement = summary["telemetry_seconds"] / measurements
    every = t.every_n_steps
    resolutions = {summary["cfg"].augment.global_crops_size, *t.resolutions}
    print(f"config overrides: {' '.join(base)}")
    print(f"baseline step time (no telemetry): {1000 * step_off:.1f} ms over {off.steps} steps")
    print(f"step time with telemetry:          {1000 * step_on:.1f} ms over {on.steps} steps")
    print(
        f"one measurement: {1000 * per_measurement:.1f} ms ({measurements} measurements, "
        f"resolutions {sorted(resolutions)}, models {list(t.models)}, "
        f"{t.num_images} images{', W&B media' if args.wandb else ''})"
    )
    print(f"overhead at every_n_steps={every}: {100 * per_measurement / (every * step_off):.2f}% of training time")
    print(f"end-to-end ratio (with / without): {on.total / off.total:.3f}")
    if summary["peak_gib"] is not None:
        print(f"peak GPU memory (rank 0, with telemetry): {summary['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()

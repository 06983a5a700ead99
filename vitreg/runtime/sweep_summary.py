"""One summary of a Hydra ``-m`` sweep: each run's directory, final loss, online kNN and emergence layer, and
the ``scripts/plot_sweep.py`` command that compares them.

Each pretraining run leaves ``<run_dir>/summary.json`` (``write_run_summary``, rank 0). ``SweepSummary`` is a
Hydra callback (``conf/hydra/default.yaml``): the jobs of a local sweep report their run directories to it
(``on_job_end``); jobs run elsewhere (a SLURM launcher) do not, so it then takes the run directories of
the sweep directory written since the sweep started. Runs without ``summary.json`` (failed, or written by
an earlier version) read their loss from ``logs/metrics.csv`` when there is one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vitreg.telemetry.store import read_records
from vitreg.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

RUN_SUMMARY = "summary.json"


def write_run_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """``<run_dir>/summary.json``: what ``pretrain`` returned (paths, steps, final loss, probes), atomically."""
    path = Path(run_dir) / RUN_SUMMARY
    atomic_write_bytes(path, (json.dumps(dict(summary), indent=1, default=str) + "\n").encode())
    return path


def _csv_final_loss(run_dir: Path) -> float | None:
    path = run_dir / "logs" / "metrics.csv"
    if not path.exists():
        return None
    loss = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                loss = float(row["train/loss"])
    return loss


def _emergence(run_dir: Path, detector: str) -> dict[str, Any] | None:
    """The teacher's emergence layer at its last measurement, and the first step it appeared at (any
    layer); None without telemetry."""
    try:
        records = [r for r in read_records(run_dir) if r.get("model") == "teacher"]
    except (FileNotFoundError, OSError, ValueError):
        return None
    if not records:
        return None
    resolution = max({r["resolution"] for r in records}, key=lambda res: sum(r["resolution"] == res for r in records))
    records = [r for r in records if r["resolution"] == resolution]
    layers = [(r["step"], (r.get("emergence_layer") or {}).get(detector)) for r in records]
    first = next((step for step, layer in layers if layer is not None), None)
    return {"detector": detector, "layer": layers[-1][1], "first_step": first, "step": layers[-1][0]}


def run_outcome(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What one run of the sweep ended with: ``run_dir``, ``registers``, ``steps``, ``final_loss``, ``knn``
    (``(k, top-1 %)`` after training, or None), ``emergence`` (see ``_emergence``) and ``finished``."""
    run_dir = Path(run_dir)
    summary_path = run_dir / RUN_SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    config = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else OmegaConf.create()
    detector = OmegaConf.select(config, "callbacks.telemetry.detector", default="valley")
    knn = None
    after = (summary.get("knn") or {}).get("after")
    if after:
        key = "top1_k20" if "top1_k20" in after else sorted(after)[-1]
        knn = (int(key.removeprefix("top1_k")), float(after[key]))
    loss = summary.get("final_loss")
    return {
        "run_dir": str(run_dir),
        "registers": OmegaConf.select(config, "registers", default=None),
        "steps": summary.get("steps"),
        "final_loss": loss if loss is not None else _csv_final_loss(run_dir),
        "knn": knn,
        "emergence": _emergence(run_dir, detector),
        "finished": summary.get("finished"),
    }


def _emergence_text(emergence: dict[str, Any] | None) -> str:
    if emergence is None:
        return "- (no telemetry)"
    if emergence["layer"] is None:
        first = emergence["first_step"]
        return f"none at step {emergence['step']}" + (f" (seen from step {first})" if first is not None else "")
    return f"layer {emergence['layer']} (from step {emergence['first_step']})"


def sweep_lines(run_dirs: list[str | os.PathLike], sweep_dir: str | os.PathLike | None = None) -> list[str]:
    """The console summary of a sweep: a table of ``run_outcome``s and the ``plot_sweep.py`` command."""
    outcomes = [run_outcome(d) for d in run_dirs]
    width = max([len("run directory"), *(len(o["run_dir"]) for o in outcomes)])
    detector = next((o["emergence"]["detector"] for o in outcomes if o["emergence"]), "valley")
    header = f"  {'run directory':<{width}}  {'R':>2}  {'steps':>6}  {'final loss':>10}  {'kNN top-1':>14}  emergence ({detector})"
    lines = [f"sweep of {len(outcomes)} runs" + (f" in {sweep_dir}" if sweep_dir else "") + ":", header]
    for o in outcomes:
        loss = f"{o['final_loss']:.4f}" if o["final_loss"] is not None else "-"
        knn = f"{o['knn'][1]:.1f}% (k={o['knn'][0]})" if o["knn"] else "-"
        registers = "-" if o["registers"] is None else str(o["registers"])
        steps = "-" if o["steps"] is None else str(o["steps"])
        if o["finished"] is False:
            steps += "*"  # stopped early (preempted, requeued)
        lines.append(
            f"  {o['run_dir']:<{width}}  {registers:>2}  {steps:>6}  {loss:>10}  {knn:>14}  {_emergence_text(o['emergence'])}"
        )
    if any(o["finished"] is False for o in outcomes):
        lines.append("  * not finished: the run stopped before trainer.max_steps (re-run the sweep to continue)")
    with_telemetry = [o["run_dir"] for o in outcomes if o["emergence"] is not None]
    if with_telemetry:
        out = Path(sweep_dir) / "sweep_plots" if sweep_dir else Path("sweep_plots")
        args = " ".join(shlex.quote(d) for d in with_telemetry)
        lines.append(f"compare them: python scripts/plot_sweep.py {args} --out {shlex.quote(str(out))}")
    return lines


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / ".hydra").is_dir()


def runs_written_since(sweep_dir: Path, since: float) -> list[Path]:
    """Run directories under ``sweep_dir`` (one or two levels down) whose config was written at or after ``since``."""
    found = [p.parent for p in sorted(sweep_dir.glob("*/config.yaml")) + sorted(sweep_dir.glob("*/*/config.yaml"))]
    return [d for d in found if _is_run_dir(d) and (d / "config.yaml").stat().st_mtime >= since]


class SweepSummary(Callback):
    """Prints ``sweep_lines`` once a ``-m`` sweep has ended (every launcher: local, submitit)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_dirs: list[str] = []
        self.start = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.run_dirs = []
        self.start = time.time() - 1.0  # file times can be a little coarse

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # a local launcher runs the job in this process: its run directory is known exactly
        output_dir = OmegaConf.select(config, "hydra.runtime.output_dir")
        if output_dir and output_dir not in self.run_dirs:
            self.run_dirs.append(output_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        runs = [d for d in self.run_dirs if _is_run_dir(Path(d))] or [
            str(d) for d in runs_written_since(sweep_dir, self.start)
        ]
        if not runs:
            log.warning("sweep summary: no run directory with a config.yaml under %s", sweep_dir)
            return
        print("\n" + "\n".join(sweep_lines(runs, sweep_dir)), flush=True)

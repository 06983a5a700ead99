"""The analysis tasks of ``train/analyze.py`` and the one table that picks them (``TASKS``).

``telemetry`` is the artifact report of ``vitreg.telemetry.analyze``; every other task is an evaluation
(``EVALUATIONS``): ``run_task`` loads the checkpoint, runs it and writes its JSON (and plots) into the
checkpoint's report folder, the same folder the telemetry report uses. Each evaluation's function
(``vitreg.eval.runners``) takes its typed settings (the dataclasses of ``vitreg.eval``) and returns the result
dict; on the main process ``run_task`` writes ``<out>/<task>.json`` = ``{"task", "checkpoint", "model",
"result", "seconds", ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitreg.eval.ablate import AblateSettings, run_ablate
from vitreg.eval.compare import MetricInputs
from vitreg.eval.knn import KNNSettings
from vitreg.eval.linear import LinearProtocol
from vitreg.eval.lost import LostSettings
from vitreg.eval.occlusion import OcclusionSettings
from vitreg.eval.register_neurons import RegisterNeuronSettings
from vitreg.eval.runners import (
    AUTOCAST_DTYPES,
    EvalDataConfig,
    autocast_dtype,
    run_global,
    run_knn,
    run_linear,
    run_local,
    run_lost,
    run_occlusion,
    run_register_neurons,
)
from vitreg.eval.summary import (
    ablate_lines,
    global_lines,
    knn_lines,
    linear_lines,
    local_lines,
    lost_lines,
    occlusion_lines,
    register_neuron_lines,
    ttr_lines,
)
from vitreg.eval.token_probes import OutlierProbeSettings
from vitreg.eval.ttr import TTRSettings, run_ttr
from vitreg.models.load import LoadedBackbone, load_backbone
from vitreg.telemetry.stats import TelemetrySettings
from vitreg.utils.distributed import rank_and_world
from vitreg.utils.io import atomic_write_bytes, json_ready

log = logging.getLogger(__name__)

__all__ = ["AUTOCAST_DTYPES", "EVALUATIONS", "TASKS", "AnalyzeConfig", "EvalDataConfig", "run_task"]


@dataclass
class AnalyzeConfig:
    """``train/analyze.py``: statistics and evaluations of any checkpoint (see conf/analyze.yaml)."""

    task: str = "telemetry"  # one of vitreg.eval.tasks.TASKS
    checkpoint: str = "???"  # OmegaConf's MISSING: the run refuses to start without it
    images: str | None = None
    num_images: int = 64
    resolutions: list[int] = field(default_factory=list)
    model: str = "teacher"
    out: str | None = None
    device: str | None = None
    seed: int = 0
    autocast: str | None = None  # null: bf16 on CUDA, none on CPU; or float32 | bfloat16 | float16
    progress: str = "auto"  # auto: a bar on a terminal, lines otherwise | bar | lines | off
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    knn: KNNSettings = field(default_factory=KNNSettings)
    linear: LinearProtocol = field(default_factory=LinearProtocol)
    lost: LostSettings = field(default_factory=LostSettings)
    outliers: OutlierProbeSettings = field(default_factory=OutlierProbeSettings)
    occlusion: OcclusionSettings = field(default_factory=OcclusionSettings)
    register_neurons: RegisterNeuronSettings = field(default_factory=RegisterNeuronSettings)
    ttr: TTRSettings = field(default_factory=TTRSettings)
    compare: str | None = None  # task=ttr: a checkpoint (e.g. trained with registers) measured beside
    ablate: AblateSettings = field(default_factory=AblateSettings)


def describe(loaded: LoadedBackbone, checkpoint: str | os.PathLike) -> dict[str, Any]:
    model = loaded.model
    return {
        "checkpoint": str(checkpoint),
        "source": loaded.source,
        "step": loaded.step,
        "embed_dim": model.embed_dim,
        "depth": model.n_blocks,
        "patch_size": model.patch_size,
        "num_register_tokens": model.num_register_tokens,
    }


def write_result(out_dir: str | os.PathLike, task: str, payload: Mapping[str, Any]) -> Path:
    """``<out>/<task>.json``, written atomically on the main process only."""
    path = Path(out_dir) / f"{task}.json"
    if rank_and_world()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            path, (json.dumps(json_ready(payload), allow_nan=False, indent=1, default=_jsonable) + "\n").encode()
        )
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def timed(task: str, fn: Callable[[], dict]) -> tuple[dict, float]:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    log.info("%s finished in %.1f s", task, seconds)
    return result, seconds


# ---------------------------------------------------------------- the table of tasks
@dataclass(frozen=True)
class TaskContext:
    """What every evaluation runs with: the config, the loaded backbone, where to write, the device."""

    cfg: AnalyzeConfig
    loaded: LoadedBackbone
    out: Path
    device: torch.device
    autocast: torch.dtype | None


@dataclass(frozen=True)
class Evaluation:
    run: Callable[[TaskContext], dict]
    reads: tuple[str, ...]  # the config sections it reads, recorded next to its result
    summary: Callable[[dict], list[str]]  # a few console lines of its result


def metric_inputs(t: TaskContext) -> MetricInputs:
    """What ``vitreg.eval.compare``'s headline numbers read, from the analysis config."""
    c = t.cfg
    sections = {key: getattr(c, key) for key in ("data", "telemetry", "knn", "linear", "lost", "outliers")}
    return MetricInputs(c.images, c.num_images, **sections, device=t.device, autocast=t.autocast, seed=c.seed)


def load_compare(t: TaskContext) -> LoadedBackbone | None:
    """``compare=``: a second checkpoint, loaded and placed like the first."""
    if t.cfg.compare is None:
        return None
    other = load_backbone(t.cfg.compare, t.cfg.model)
    other.model.to(t.device).eval().requires_grad_(False)
    return other


# the sections every comparison's metrics read
METRIC_SECTIONS = ("images", "num_images", "data", "telemetry", "knn", "linear", "lost", "outliers", "seed", "autocast")

EVALUATIONS: dict[str, Evaluation] = {
    "knn": Evaluation(
        lambda t: run_knn(t.loaded, t.cfg.data, t.cfg.knn, device=t.device, autocast=t.autocast, seed=t.cfg.seed),
        ("data", "knn", "seed", "autocast"),
        knn_lines,
    ),
    "linear": Evaluation(
        lambda t: run_linear(
            t.loaded, t.cfg.data, t.cfg.linear, t.out, device=t.device, autocast=t.autocast, seed=t.cfg.seed
        ),
        ("data", "linear", "seed", "autocast"),
        linear_lines,
    ),
    "lost": Evaluation(
        lambda t: run_lost(t.loaded, t.cfg.lost, t.out, device=t.device, seed=t.cfg.seed),
        ("lost", "seed"),
        lost_lines,
    ),
    "local": Evaluation(
        lambda t: run_local(
            t.loaded,
            t.cfg.images,
            t.cfg.num_images,
            t.cfg.data,
            t.cfg.outliers,
            t.out,
            device=t.device,
            seed=t.cfg.seed,
        ),
        ("images", "num_images", "outliers", "seed"),
        local_lines,
    ),
    "global": Evaluation(
        lambda t: run_global(t.loaded, t.cfg.data, t.cfg.outliers, t.out, device=t.device, seed=t.cfg.seed),
        ("data", "outliers", "seed"),
        global_lines,
    ),
    "register_neurons": Evaluation(
        lambda t: run_register_neurons(
            t.loaded,
            t.cfg.images,
            t.cfg.num_images,
            t.cfg.data,
            t.cfg.register_neurons,
            device=t.device,
            seed=t.cfg.seed,
        ),
        ("images", "num_images", "register_neurons", "seed"),
        register_neuron_lines,
    ),
    "occlusion": Evaluation(
        lambda t: run_occlusion(
            t.loaded,
            t.cfg.images,
            t.cfg.num_images,
            t.cfg.data,
            t.cfg.occlusion,
            t.out,
            device=t.device,
            seed=t.cfg.seed,
        ),
        ("images", "num_images", "occlusion", "seed"),
        occlusion_lines,
    ),
    "ttr": Evaluation(
        lambda t: run_ttr(t.loaded, t.cfg.ttr, t.cfg.register_neurons, metric_inputs(t), t.out, load_compare(t)),
        ("ttr", "register_neurons", "compare", *METRIC_SECTIONS),
        ttr_lines,
    ),
    "ablate": Evaluation(
        lambda t: run_ablate(t.loaded, metric_inputs(t), t.cfg.ablate, t.out),
        ("ablate", *METRIC_SECTIONS),
        ablate_lines,
    ),
}
# every task train/analyze.py runs: the telemetry report (vitreg.telemetry.analyze, one process) and the evaluations
TASKS: tuple[str, ...] = ("telemetry", *EVALUATIONS)


def _setting(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def run_task(cfg: AnalyzeConfig, out_dir: str | os.PathLike, device: torch.device) -> tuple[Path, dict]:
    """Run the evaluation ``cfg.task`` on ``cfg.checkpoint``; every process takes part (kNN and linear split
    their images over the processes), the main one writes ``<out_dir>/<task>.json``. Returns (that path,
    the payload)."""

    if cfg.task not in EVALUATIONS:
        raise ValueError(f"task={cfg.task!r} is not an evaluation task; use one of {', '.join(EVALUATIONS)}")
    evaluation = EVALUATIONS[cfg.task]
    loaded = load_backbone(cfg.checkpoint, cfg.model)
    loaded.model.to(device).eval().requires_grad_(False)
    out = Path(out_dir)
    if rank_and_world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
    context = TaskContext(cfg, loaded, out, device, autocast_dtype(cfg.autocast, device))
    result, seconds = timed(cfg.task, lambda: evaluation.run(context))
    payload = {
        "task": cfg.task,
        **describe(loaded, cfg.checkpoint),
        "model": cfg.model,
        "settings": {key: _setting(getattr(cfg, key)) for key in evaluation.reads},
        "world_size": rank_and_world()[1],
        "device": str(device),
        "seconds": round(seconds, 3),
        "result": result,
    }
    return write_result(out, cfg.task, payload), payload

"""Artifact statistics and evaluations of any checkpoint, written into its report folder.

python train/analyze.py checkpoint=outputs/demo/checkpoints/last.ckpt                 # telemetry report
python train/analyze.py checkpoint=dinov2_vitl14_pretrain.pth images=/data/photos resolutions=[224,448]
python train/analyze.py task=knn checkpoint=... data.train=shards/in1k-train data.val=shards/in1k-val
torchrun --nproc_per_node=8 train/analyze.py task=linear checkpoint=... data.train=... data.val=...
python train/analyze.py task=lost checkpoint=... lost.dataset=VOCdevkit/VOC2007 lost.image_set=trainval
python train/analyze.py task=local|global|occlusion checkpoint=... images=/data/photos

Tasks and their outputs: docs/evaluation.md (evaluations) and docs/telemetry.md (telemetry).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vitreg.config import ConfigError, register_configs, to_dataclass, validate_analyze_config
from vitreg.eval.progress import set_progress
from vitreg.eval.tasks import EVALUATIONS, AnalyzeConfig, run_task
from vitreg.runtime.console import quiet_other_ranks
from vitreg.runtime.launch import init_distributed, shutdown_distributed
from vitreg.runtime.report_dir import default_report_dir, link_last
from vitreg.telemetry.analyze import analyze_checkpoint

register_configs()
PATH_KEYS = ("checkpoint", "images", "out", "data.train", "data.val", "lost.dataset")


def quote_path_overrides(argv: list[str]) -> list[str]:
    """Quote path values Hydra's override grammar would misread, e.g. a sweep run's
    ``checkpoint=outputs/demo/registers=4/checkpoints/last.ckpt`` (the second ``=``)."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in PATH_KEYS and value and value[0] not in "'\"" and any(c in value for c in "=,[]{}()' "):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            arg = f"{key}={value}"
        quoted.append(arg)
    return quoted


@hydra.main(version_base="1.3", config_path="../conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    try:
        validate_analyze_config(cfg)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    # a run's checkpoint: <run_dir>/analysis/step<N> by the step inside (last.ckpt changes), `last` links the newest
    out = Path(cfg.out) if cfg.out else default_report_dir(cfg.checkpoint)
    analysis = to_dataclass(AnalyzeConfig, cfg)
    if analysis.task == "telemetry":  # the one task of vitreg.eval.tasks.TASKS that is not an evaluation
        telemetry(analysis, out)
    else:
        evaluate(analysis, out)


def evaluate(cfg: AnalyzeConfig, out: Path) -> None:
    info, device = init_distributed(cfg.device)
    quiet_other_ranks(info.rank)  # one copy of each info line, not one per process
    set_progress(cfg.progress)  # bars or lines for the long loops (rank 0 only)
    try:
        path, payload = run_task(cfg, out, device)
    except ValueError as err:  # bad data or settings found while reading them: say what, not a traceback
        sys.exit(f"{cfg.task} failed: {err}")
    finally:
        shutdown_distributed()
    if info.is_main:
        link_last(out)
        print(
            f"\n{cfg.task} of {Path(cfg.checkpoint).name} ({payload['source']}, {payload['seconds']:.1f} s) -> {path}"
        )
        for line in EVALUATIONS[cfg.task].summary(payload["result"]):
            print(f"  {line}")


def telemetry(cfg: AnalyzeConfig, out: Path) -> None:
    summary = analyze_checkpoint(
        cfg.checkpoint,
        out,
        images=cfg.images,
        num_images=cfg.num_images,
        resolutions=cfg.resolutions,
        which=cfg.model,
        settings=cfg.telemetry,
        device=cfg.device,
        seed=cfg.seed,
    )
    link_last(out)
    for res, report in summary["reports"].items():
        data = json.loads(Path(report["json"]).read_text())
        s = data["summary"]
        print(f"\n{Path(cfg.checkpoint).name} ({summary['source']}) at {res}px -> {Path(report['json']).parent}")
        for key, value in s.items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *quote_path_overrides(sys.argv[1:])]
    main()

"""The evaluation tasks of ``train/analyze.py``: load a checkpoint, run one evaluation, write its JSON
(and plots) into the checkpoint's report folder — the same folder the telemetry report uses.

Each ``run_<task>`` takes plain settings (no Hydra here), returns the result dict and, on the main
process, writes ``<out>/<task>.json`` = ``{"task", "checkpoint", "model", "result", "seconds", ...}``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from vitreg.telemetry.analyze import LoadedBackbone
from vitreg.telemetry.store import json_ready
from vitreg.utils.distributed import rank_and_world
from vitreg.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """``null``: bf16 on CUDA (DINOv2 evaluates under autocast), full precision on CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else None
    return AUTOCAST_DTYPES[name]


def eval_resolution(requested: int | None, loaded: LoadedBackbone) -> int:
    resolution = requested or loaded.train_resolution
    if resolution % loaded.model.patch_size:
        raise ValueError(
            f"data.resolution={resolution} is not a multiple of the checkpoint's patch size "
            f"{loaded.model.patch_size}; pick e.g. {resolution - resolution % loaded.model.patch_size}"
        )
    return resolution


def describe(loaded: LoadedBackbone, checkpoint: str | os.PathLike) -> dict[str, Any]:
    model = loaded.model
    return {
        "checkpoint": str(checkpoint),
        "source": loaded.source,
        "step": loaded.step,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
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


# ---------------------------------------------------------------- labelled-image tasks
def synthetic_options(data: Mapping[str, Any]) -> dict[str, int]:
    return {
        "num_images": int(data["synthetic_images"]),
        "image_size": int(data["synthetic_image_size"]),
        "num_classes": int(data["synthetic_classes"]),
    }


def _synthetic_for(source: str, data: Mapping[str, Any]) -> dict[str, int] | None:
    return synthetic_options(data) if source == "synthetic" else None


def run_knn(
    loaded: LoadedBackbone,
    data: Mapping[str, Any],
    knn: Mapping[str, Any],
    *,
    device: torch.device,
    autocast: torch.dtype | None,
    seed: int = 0,
) -> dict:
    """DINOv2's kNN (``vitreg.eval.knn``) on the final-norm CLS of ``data.train`` (bank) and ``data.val``."""
    from vitreg.eval.data import eval_loader, eval_transform
    from vitreg.eval.knn import evaluate_knn

    resolution = eval_resolution(data.get("resolution"), loaded)
    loaders = [
        eval_loader(
            data[split],
            eval_transform(resolution),
            batch_size=int(data["batch_size"]),
            num_workers=int(data["num_workers"]),
            limit=data[f"limit_{split}"],
            split=split,
            synthetic=_synthetic_for(data[split], data),
            seed=seed,
        )
        for split in ("train", "val")
    ]
    result = evaluate_knn(
        loaded.model,
        *loaders,
        ks=list(knn["ks"]),
        temperature=float(knn["temperature"]),
        device=device,
        autocast_dtype=autocast,
    )
    result["resolution"] = resolution
    return result


def run_linear(
    loaded: LoadedBackbone,
    data: Mapping[str, Any],
    linear: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    autocast: torch.dtype | None,
    seed: int = 0,
) -> dict:
    """DINOv2's linear protocol (``vitreg.eval.linear``); the best classifier goes to ``linear_best.pt``."""
    from vitreg.eval.linear import LinearSettings, evaluate_linear

    resolution = eval_resolution(data.get("resolution"), loaded)
    settings = LinearSettings(
        n_last_blocks=tuple(int(n) for n in linear["n_last_blocks"]),
        learning_rates=tuple(float(lr) for lr in linear["learning_rates"]),
        epochs=int(linear["epochs"]),
        iterations_per_epoch=int(linear["iterations_per_epoch"]),
        batch_size=int(linear["batch_size"]),
        mode=str(linear["mode"]),
        seed=seed,
        resolution=resolution,
    )
    synthetic = synthetic_options(data) if "synthetic" in (data["train"], data["val"]) else None
    return evaluate_linear(
        loaded.model,
        data["train"],
        data["val"],
        settings,
        best_checkpoint_path=Path(out_dir) / "linear_best.pt",
        synthetic=synthetic,
        train_limit=data["limit_train"],
        val_limit=data["limit_val"],
        num_workers=int(data["num_workers"]),
        device=device,
        autocast_dtype=autocast,
    )


# ---------------------------------------------------------------- object discovery
def run_lost(
    loaded: LoadedBackbone, lost: Mapping[str, Any], out_dir: str | os.PathLike, *, device: torch.device, seed: int = 0
) -> dict:
    """LOST + CorLoc (``vitreg.eval.lost``) on ``lost.dataset`` or generated images, plus an example PNG."""
    from vitreg.eval.boxes import load_box_dataset
    from vitreg.eval.generated import write_object_images
    from vitreg.eval.lost import evaluate_lost, plot_lost_examples, sweep_lost

    out = Path(out_dir)
    if lost["dataset"] is None:
        source = write_object_images(out / "lost_generated", int(lost["generated_images"]), size=224, seed=seed)
        log.info("lost.dataset=null: %d generated images with one object each (%s)", lost["generated_images"], source)
    else:
        source = Path(lost["dataset"])
    dataset = load_box_dataset(source, image_set=lost["image_set"], no_hard=bool(lost["no_hard"]), limit=lost["limit"])
    if not dataset:
        raise ValueError(f"lost.dataset={source}: no image with a ground-truth box (check lost.image_set / no_hard)")
    model = loaded.model
    common = {"k_patches": int(lost["k_patches"]), "max_side": lost["max_side"], "device": device}
    setting = {
        "layer": int(lost["layer"]),
        "kind": str(lost["kind"]),
        "normalize": str(lost["normalize"]),
        "gram_bias": float(lost["gram_bias"]),
    }
    result = evaluate_lost(model, dataset, **setting, **common, progress=True)  # as set_progress says
    result["dataset"] = str(source)
    if lost["sweep"]:
        result["sweep"] = sweep_lost(
            model,
            dataset,
            layers=[int(v) for v in lost["sweep_layers"]],
            kinds=[str(v) for v in lost["sweep_kinds"]],
            biases=[float(v) for v in lost["sweep_biases"]],
            normalizations=[str(v) for v in lost["sweep_normalize"]],
            **common,
            progress=True,
        )
    if int(lost["num_examples"]) > 0 and rank_and_world()[0] == 0:
        examples = plot_lost_examples(
            model, dataset, out / "lost_examples.png", num_images=int(lost["num_examples"]), **setting, **common
        )
        result["examples"] = str(examples)
    return result


# ---------------------------------------------------------------- outlier tokens and occlusion
def probe_images(
    loaded: LoadedBackbone, images: str | None, num_images: int, resolution: int | None, seed: int
) -> tuple[torch.Tensor, int]:
    """Normalised (N, 3, R, R) images of the label-free analyses: the first ``num_images`` of a folder,
    shards or an image, or held-out synthetic images — the same inputs as the telemetry report."""
    from vitreg.telemetry.probe import image_probe, probe_tensor, synthetic_probe

    resolution = eval_resolution(resolution, loaded)
    if images is None:
        raw = synthetic_probe(num_images, image_size=resolution, seed=seed, size=resolution)
    else:
        raw = image_probe(images, num_images, resolution)
    return probe_tensor(raw, resolution), resolution


def _detector_kwargs(outliers: Mapping[str, Any]) -> dict[str, Any]:
    from vitreg.telemetry.detectors import DetectorSettings

    return {
        "layer": int(outliers["layer"]),
        "features": str(outliers["features"]),
        "detector": str(outliers["detector"]),
        "cutoff": float(outliers["fixed_cutoff"]),
        "settings": DetectorSettings(
            fixed_cutoff=float(outliers["fixed_cutoff"]), robust_z=float(outliers["robust_z"])
        ),
    }


def run_local(
    loaded: LoadedBackbone,
    images: str | None,
    num_images: int,
    data: Mapping[str, Any],
    outliers: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Fig. 5b: linear position and pixel-reconstruction probes for normal vs outlier patch tokens."""
    from vitreg.eval.token_probes import collect_tokens, local_probes, plot_token_probes

    batch, resolution = probe_images(loaded, images, num_images, data.get("resolution"), seed)
    tokens = collect_tokens(loaded.model, batch.to(device), **_detector_kwargs(outliers))
    result = local_probes(
        tokens,
        fit_on=str(outliers["fit_on"]),
        test_fraction=float(outliers["test_fraction"]),
        seed=seed,
        min_outliers=int(outliers["min_outliers"]),
    )
    result.update(resolution=resolution, num_images=int(batch.shape[0]), images=images or "synthetic")
    if rank_and_world()[0] == 0:
        result["plot"] = str(plot_token_probes(result, Path(out_dir) / "local_probes.png"))
    return result


def run_global(
    loaded: LoadedBackbone,
    data: Mapping[str, Any],
    outliers: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Table 1: classify the image label from one token (CLS, a normal patch, an outlier, each register),
    on the labelled ``data.train`` images split by image into train and test."""
    from vitreg.eval.data import eval_loader, eval_transform
    from vitreg.eval.token_probes import collect_tokens, global_probe, plot_token_probes

    resolution = eval_resolution(data.get("resolution"), loaded)
    loader = eval_loader(
        data["train"],
        eval_transform(resolution),
        batch_size=int(data["batch_size"]),
        num_workers=int(data["num_workers"]),
        limit=data["limit_train"],
        split="train",
        synthetic=_synthetic_for(data["train"], data),
        seed=seed,
    )
    labels: list[torch.Tensor] = []

    def images_of(batches):  # the tokens and their labels, in the same order
        for images, y, _ in batches:
            labels.append(y)
            yield images.to(device)

    tokens = collect_tokens(loaded.model, images_of(loader), **_detector_kwargs(outliers))
    result = global_probe(
        tokens,
        torch.cat(labels),
        classifier=str(outliers["classifier"]),
        repeats=int(outliers["repeats"]),
        test_fraction=float(outliers["test_fraction"]),
        seed=seed,
        min_outliers=int(outliers["min_outliers"]),
    )
    result.update(resolution=resolution, source=data["train"])
    if rank_and_world()[0] == 0:
        result["plot"] = str(plot_token_probes(result, Path(out_dir) / "global_probe.png"))
    return result


def run_occlusion(
    loaded: LoadedBackbone,
    images: str | None,
    num_images: int,
    data: Mapping[str, Any],
    occlusion: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Naseer et al.: clean-vs-PatchDrop feature correlation per layer, and attention faithfulness."""
    from vitreg.eval.occlusion import attention_faithfulness, feature_correlation, plot_occlusion

    batch, resolution = probe_images(loaded, images, num_images, data.get("resolution"), seed)
    batch = batch.to(device)
    repeats = int(occlusion["repeats"])
    result = {
        "random": feature_correlation(
            loaded.model, batch, [float(f) for f in occlusion["fractions"]], repeats=repeats, seed=seed
        ),
        "faithfulness": attention_faithfulness(
            loaded.model, batch, [float(f) for f in occlusion["faithfulness_fractions"]], repeats=repeats, seed=seed
        ),
        "resolution": resolution,
        "num_images": int(batch.shape[0]),
        "images": images or "synthetic",
    }
    if rank_and_world()[0] == 0:
        result["plot"] = str(
            plot_occlusion([result["random"], result["faithfulness"]], Path(out_dir) / "occlusion.png")
        )
    return result


# ---------------------------------------------------------------- one entry for train/analyze.py
def run_task(cfg: Mapping[str, Any], out_dir: str | os.PathLike, device: torch.device) -> tuple[Path, dict]:
    """Run ``cfg["task"]`` (an ``AnalyzeConfig`` as a plain dict) on ``cfg["checkpoint"]``; every process
    takes part (kNN and linear split their images over the processes), the main one writes
    ``<out_dir>/<task>.json``. Returns (that path, the payload)."""
    from vitreg.telemetry.analyze import load_backbone

    task, seed = cfg["task"], int(cfg["seed"])
    loaded = load_backbone(cfg["checkpoint"], cfg["model"])
    loaded.model.to(device).eval().requires_grad_(False)
    autocast = autocast_dtype(cfg["autocast"], device)
    out = Path(out_dir)
    if rank_and_world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
    data, images, num_images = cfg["data"], cfg["images"], int(cfg["num_images"])
    runners: dict[str, Callable[[], dict]] = {
        "knn": lambda: run_knn(loaded, data, cfg["knn"], device=device, autocast=autocast, seed=seed),
        "linear": lambda: run_linear(loaded, data, cfg["linear"], out, device=device, autocast=autocast, seed=seed),
        "lost": lambda: run_lost(loaded, cfg["lost"], out, device=device, seed=seed),
        "local": lambda: run_local(loaded, images, num_images, data, cfg["outliers"], out, device=device, seed=seed),
        "global": lambda: run_global(loaded, data, cfg["outliers"], out, device=device, seed=seed),
        "occlusion": lambda: run_occlusion(
            loaded, images, num_images, data, cfg["occlusion"], out, device=device, seed=seed
        ),
    }
    if task not in runners:
        raise ValueError(f"task={task!r} is not an evaluation task; use one of {', '.join(runners)}")
    result, seconds = timed(task, runners[task])
    payload = {
        "task": task,
        **describe(loaded, cfg["checkpoint"]),
        "model": cfg["model"],
        "settings": {key: cfg[key] for key in TASK_SETTINGS[task]},
        "world_size": rank_and_world()[1],
        "device": str(device),
        "seconds": round(seconds, 3),
        "result": result,
    }
    return write_result(out, task, payload), payload


# the config sections each task reads, recorded next to its result
TASK_SETTINGS = {
    "knn": ("data", "knn", "seed", "autocast"),
    "linear": ("data", "linear", "seed", "autocast"),
    "lost": ("lost", "seed"),
    "local": ("images", "num_images", "outliers", "seed"),
    "global": ("data", "outliers", "seed"),
    "occlusion": ("images", "num_images", "occlusion", "seed"),
}

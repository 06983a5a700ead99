"""The evaluations of ``train/analyze.py``, each as one function of a loaded backbone and its typed settings.

``vitreg.eval.tasks`` picks one by name (``EVALUATIONS``); the comparisons of interventions
(``vitreg.eval.compare``) run several of them on a changed model. Each takes a ``LoadedBackbone``, so a
backbone with test-time registers, or under an edit, is evaluated exactly as a plain one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitreg.data.probe import image_probe, probe_tensor, synthetic_probe
from vitreg.data.transforms import eval_transform
from vitreg.eval.boxes import load_box_dataset
from vitreg.eval.data import eval_loader
from vitreg.eval.generated import write_object_images
from vitreg.eval.knn import KNNSettings, evaluate_knn
from vitreg.eval.linear import LinearProtocol, LinearSettings, evaluate_linear
from vitreg.eval.lost import LostSettings, evaluate_lost, plot_lost_examples, sweep_lost
from vitreg.eval.occlusion import OcclusionSettings, attention_faithfulness, feature_correlation, plot_occlusion
from vitreg.eval.register_neurons import RegisterNeuronSettings, find_register_neurons
from vitreg.eval.token_probes import OutlierProbeSettings, collect_tokens, global_probe, local_probes, plot_token_probes
from vitreg.models.load import LoadedBackbone
from vitreg.utils.distributed import rank_and_world

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EvalDataConfig:
    """Labelled images of the kNN, linear and global-probe tasks (vitreg/eval/data.py)."""

    train: str = "synthetic"  # class-folder tree, list file, labelled shards, or synthetic
    val: str = "synthetic"
    resolution: int | None = None  # null: the checkpoint's training resolution (224 for official weights)
    batch_size: int = 64  # per process, for feature extraction
    num_workers: int = 4
    limit_train: int | None = None  # the first N images of a source
    limit_val: int | None = None
    synthetic_images: int = 2000  # per split, when a source is synthetic
    synthetic_image_size: int = 64
    synthetic_classes: int = 10


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


# ---------------------------------------------------------------- labelled-image tasks
def synthetic_options(data: EvalDataConfig) -> dict[str, int]:
    return {
        "num_images": data.synthetic_images,
        "image_size": data.synthetic_image_size,
        "num_classes": data.synthetic_classes,
    }


def _synthetic_for(source: str, data: EvalDataConfig) -> dict[str, int] | None:
    return synthetic_options(data) if source == "synthetic" else None


def run_knn(
    loaded: LoadedBackbone,
    data: EvalDataConfig,
    knn: KNNSettings,
    *,
    device: torch.device,
    autocast: torch.dtype | None,
    seed: int = 0,
) -> dict:
    """DINOv2's kNN (``vitreg.eval.knn``) on the final-norm CLS of ``data.train`` (bank) and ``data.val``."""

    resolution = eval_resolution(data.resolution, loaded)
    loaders = [
        eval_loader(
            getattr(data, split),
            eval_transform(resolution),
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            limit=getattr(data, f"limit_{split}"),
            split=split,
            synthetic=_synthetic_for(getattr(data, split), data),
            seed=seed,
        )
        for split in ("train", "val")
    ]
    result = evaluate_knn(
        loaded.model, *loaders, ks=knn.ks, temperature=knn.temperature, device=device, autocast_dtype=autocast
    )
    result["resolution"] = resolution
    return result


def run_linear(
    loaded: LoadedBackbone,
    data: EvalDataConfig,
    linear: LinearProtocol,
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    autocast: torch.dtype | None,
    seed: int = 0,
) -> dict:
    """DINOv2's linear protocol (``vitreg.eval.linear``); the best classifier goes to ``linear_best.pt``."""

    resolution = eval_resolution(data.resolution, loaded)
    settings = LinearSettings(**vars(linear), seed=seed, resolution=resolution)
    synthetic = synthetic_options(data) if "synthetic" in (data.train, data.val) else None
    return evaluate_linear(
        loaded.model,
        data.train,
        data.val,
        settings,
        best_checkpoint_path=Path(out_dir) / "linear_best.pt",
        synthetic=synthetic,
        train_limit=data.limit_train,
        val_limit=data.limit_val,
        num_workers=data.num_workers,
        device=device,
        autocast_dtype=autocast,
    )


# ---------------------------------------------------------------- object discovery
def run_lost(
    loaded: LoadedBackbone, lost: LostSettings, out_dir: str | os.PathLike, *, device: torch.device, seed: int = 0
) -> dict:
    """LOST + CorLoc (``vitreg.eval.lost``) on ``lost.dataset`` or generated images, plus an example PNG."""

    out = Path(out_dir)
    if lost.dataset is None:
        source = write_object_images(out / "lost_generated", lost.generated_images, size=224, seed=seed)
        log.info("lost.dataset=null: %d generated images with one object each (%s)", lost.generated_images, source)
    else:
        source = Path(lost.dataset)
    dataset = load_box_dataset(source, image_set=lost.image_set, no_hard=lost.no_hard, limit=lost.limit)
    if not dataset:
        raise ValueError(f"lost.dataset={source}: no image with a ground-truth box (check lost.image_set / no_hard)")
    model = loaded.model
    common = {"k_patches": lost.k_patches, "max_side": lost.max_side, "device": device}
    setting = {"layer": lost.layer, "kind": lost.kind, "normalize": lost.normalize, "gram_bias": lost.gram_bias}
    result = evaluate_lost(model, dataset, **setting, **common, progress=True)  # as set_progress says
    result["dataset"] = str(source)
    if lost.sweep:
        result["sweep"] = sweep_lost(
            model,
            dataset,
            layers=lost.sweep_layers,
            kinds=lost.sweep_kinds,
            biases=lost.sweep_biases,
            normalizations=lost.sweep_normalize,
            **common,
            progress=True,
        )
    if lost.num_examples > 0 and rank_and_world()[0] == 0:
        examples = plot_lost_examples(
            model, dataset, out / "lost_examples.png", num_images=lost.num_examples, **setting, **common
        )
        result["examples"] = str(examples)
    return result


# ---------------------------------------------------------------- outlier tokens and occlusion
def raw_probe_images(
    loaded: LoadedBackbone, images: str | None, num_images: int, resolution: int | None, seed: int
) -> tuple[torch.Tensor, int]:
    """The uint8 (N, 3, R, R) images of the label-free analyses, at the evaluation resolution: the first
    ``num_images`` of a folder, shards or an image, or held-out synthetic images — the telemetry's inputs."""

    resolution = eval_resolution(resolution, loaded)
    if images is None:
        return synthetic_probe(num_images, image_size=resolution, seed=seed, size=resolution), resolution
    return image_probe(images, num_images, resolution), resolution


def probe_images(
    loaded: LoadedBackbone, images: str | None, num_images: int, resolution: int | None, seed: int
) -> tuple[torch.Tensor, int]:
    """``raw_probe_images`` normalised for the backbone (float, ImageNet mean and std)."""
    raw, resolution = raw_probe_images(loaded, images, num_images, resolution, seed)
    return probe_tensor(raw, resolution), resolution


def run_register_neurons(
    loaded: LoadedBackbone,
    images: str | None,
    num_images: int,
    data: EvalDataConfig,
    settings: RegisterNeuronSettings,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Jiang et al. 2025, Alg. 1: the FFN neurons that write the outlier norms (``vitreg.eval.register_neurons``)."""
    batch, resolution = probe_images(loaded, images, num_images, data.resolution, seed)
    result = find_register_neurons(loaded.model, batch.to(device), settings)
    result.update(resolution=resolution, images=images or "synthetic")
    return result


def _detector_kwargs(outliers: OutlierProbeSettings) -> dict[str, Any]:
    return {
        "layer": outliers.layer,
        "features": outliers.features,
        "detector": outliers.detector,
        "cutoff": outliers.fixed_cutoff,
        "settings": outliers.detectors,
    }


def run_local(
    loaded: LoadedBackbone,
    images: str | None,
    num_images: int,
    data: EvalDataConfig,
    outliers: OutlierProbeSettings,
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Fig. 5b: linear position and pixel-reconstruction probes for normal vs outlier patch tokens."""

    batch, resolution = probe_images(loaded, images, num_images, data.resolution, seed)
    tokens = collect_tokens(loaded.model, batch.to(device), **_detector_kwargs(outliers))
    result = local_probes(
        tokens,
        fit_on=outliers.fit_on,
        test_fraction=outliers.test_fraction,
        seed=seed,
        min_outliers=outliers.min_outliers,
    )
    result.update(resolution=resolution, num_images=int(batch.shape[0]), images=images or "synthetic")
    if rank_and_world()[0] == 0:
        result["plot"] = str(plot_token_probes(result, Path(out_dir) / "local_probes.png"))
    return result


def run_global(
    loaded: LoadedBackbone,
    data: EvalDataConfig,
    outliers: OutlierProbeSettings,
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Table 1: classify the image label from one token (CLS, a normal patch, an outlier, each register),
    on the labelled ``data.train`` images split by image into train and test."""

    resolution = eval_resolution(data.resolution, loaded)
    loader = eval_loader(
        data.train,
        eval_transform(resolution),
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        limit=data.limit_train,
        split="train",
        synthetic=_synthetic_for(data.train, data),
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
        classifier=outliers.classifier,
        repeats=outliers.repeats,
        test_fraction=outliers.test_fraction,
        seed=seed,
        min_outliers=outliers.min_outliers,
    )
    result.update(resolution=resolution, source=data.train)
    if rank_and_world()[0] == 0:
        result["plot"] = str(plot_token_probes(result, Path(out_dir) / "global_probe.png"))
    return result


def run_occlusion(
    loaded: LoadedBackbone,
    images: str | None,
    num_images: int,
    data: EvalDataConfig,
    occlusion: OcclusionSettings,
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Naseer et al.: clean-vs-PatchDrop feature correlation per layer, and attention faithfulness."""

    batch, resolution = probe_images(loaded, images, num_images, data.resolution, seed)
    batch = batch.to(device)
    repeats = occlusion.repeats
    result = {
        "random": feature_correlation(loaded.model, batch, occlusion.fractions, repeats=repeats, seed=seed),
        "faithfulness": attention_faithfulness(
            loaded.model, batch, occlusion.faithfulness_fractions, repeats=repeats, seed=seed
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

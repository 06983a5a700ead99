"""What outlier ("high-norm") patch tokens know: the local and global probes of Darcet et al. (2024).

- **Position** (Fig. 5b): a linear classifier predicts each patch token's grid position.
- **Pixel reconstruction** (Fig. 5b): ridge regression predicts the patch's input pixels.
- **Global** (Table 1): per image one token of a kind (CLS, a random normal patch, a random outlier
  patch, each register) feeds a classifier of the image label.

Outliers. A patch token is an outlier when the L2 norm of the chosen layer's output *before the
final LayerNorm* (``x_prenorm`` for the last layer) is above a threshold fitted, with one of
``vitreg.telemetry.detectors``' detectors, on all patch norms of the probe set. The probes read the
same layer's tokens *after* the final norm (DINOv2's output; ``features="prenorm"`` switches).
Registers are never patches: patches are the tokens after ``1 + R``.

Protocol choices (the paper gives no more detail than this):

- Train/test splits are by image (seeded), so no image is on both sides.
- Position: by default one linear model is fitted on *all* training tokens and evaluated separately
  on normal and outlier test tokens (``fit_on="all"``); that is our reading of Fig. 5b ("a linear
  model trained to predict the position", then compared between token groups). ``fit_on="group"``
  fits one model per group on that group's training tokens instead.
- Reconstruction targets are the *normalised* input pixels the model saw (ImageNet mean/std), each
  patch flattened in (channel, row, column) order: 3·p·p values.
- Global: the CLS and register tokens are not random, so they are fitted once and their std is 0;
  the normal/outlier choice is redrawn ``repeats`` times (seeded) and reported as mean ± std
  (population std over repeats). Images without any outlier patch are left out of the outlier kind.
- Regularisation ("auto") is chosen by 3-fold cross-validation on the training images only.
- Accuracies are in percent, like the paper.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vitreg.eval.progress import TaskProgress, track
from vitreg.eval.ridge import (
    accuracy,
    classify,
    fit_ridge,
    log_grid,
    logistic_fit,
    logistic_regression,
    neg_mse,
    predict,
    ridge_classifier,
    select_alpha,
)
from vitreg.telemetry.detectors import DETECTORS, DetectorSettings, thresholds

FEATURES = ("normed", "prenorm")
FIT_ON = ("all", "group")
CLASSIFIERS = ("logistic", "ridge")
GROUPS = ("normal", "outlier")

RIDGE_GRID = log_grid(-2, 4, 7)  # alpha on standardised features
C_GRID = log_grid(-3, 3, 7)  # logistic C (scikit-learn convention) on standardised features


@dataclass
class OutlierProbeSettings:
    """The ``outliers`` section of conf/analyze.yaml: the paper's local (position, pixels) and global
    (single-token) probes of normal vs outlier tokens."""

    layer: int = -1  # tokens of this block's output
    detector: str = "valley"  # one of DETECTORS, fitted on the probe set's patch norms (before the final norm)
    fixed_cutoff: float = DetectorSettings.fixed_cutoff
    robust_z: float = DetectorSettings.robust_z
    features: str = "normed"  # one of FEATURES: after the final norm (DINOv2's output) or before it
    fit_on: str = "all"  # one of FIT_ON: one probe on all tokens (scored per group), or one per group
    test_fraction: float = 0.25  # held-out images
    repeats: int = 5  # random token draws of the global probe
    classifier: str = "logistic"  # one of CLASSIFIERS (global probe)
    min_outliers: int = 10  # fewer outlier tokens: the outlier entries are null

    @property
    def detectors(self) -> DetectorSettings:
        """The detectors' parameters; the valley detector's own keep their defaults."""
        return DetectorSettings(fixed_cutoff=self.fixed_cutoff, robust_z=self.robust_z)


@dataclass
class TokenSet:
    """Tokens of one layer for a probe set of ``N`` images with a ``(h, w)`` grid of ``P`` patches."""

    patches: Tensor  # (N, P, D) probe features ("normed" or "prenorm")
    pixels: Tensor  # (N, P, 3*p*p) the normalised input pixels of each patch, (c, row, col) order
    norms: Tensor  # (N, P) L2 norm of the pre-final-norm patch tokens (the outlier criterion)
    outliers: Tensor  # (N, P) bool: norms > threshold
    cls: Tensor  # (N, D) CLS token, same feature kind as ``patches``
    registers: Tensor  # (N, R, D) register tokens, same feature kind (R may be 0)
    grid: tuple[int, int]
    threshold: float  # inf when the detector found no outliers
    detector: str
    layer: int  # block index (0-based) whose output was read
    features: str = "normed"

    @property
    def num_images(self) -> int:
        return self.patches.shape[0]

    @property
    def num_patches(self) -> int:
        return self.patches.shape[1]


# ------------------------------------------------------------------------------------------ collection


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be a (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
    else:
        yield from images


def patch_pixels(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, P, C*p*p): each patch's pixels in (channel, row, column) order, patches
    row-major like the model's tokens."""
    b, c, h, w = images.shape
    p = patch_size
    cells = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, (h // p) * (w // p), c * p * p)


def outlier_threshold(
    norms: Tensor, detector: str = "valley", *, cutoff: float | None = None, settings: DetectorSettings | None = None
) -> float:
    """Threshold of ``detector`` fitted on a sample of patch norms (``cutoff`` sets the fixed one)."""
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    settings = settings or DetectorSettings()
    if cutoff is not None:
        settings = dataclasses.replace(settings, fixed_cutoff=float(cutoff))
    return thresholds(norms.flatten(), settings)[detector]


@torch.no_grad()
def collect_tokens(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    *,
    layer: int = -1,
    features: str = "normed",
    detector: str = "valley",
    cutoff: float | None = None,
    settings: DetectorSettings | None = None,
    batch_size: int = 32,
) -> TokenSet:
    """Run ``model`` on normalised images and gather one layer's tokens, patch pixels and outliers.

    ``images``: a (N, 3, H, W) tensor (split into ``batch_size`` chunks) or an iterable of batches.
    Outputs live on the CPU in float32.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    block = model.resolve_block(layer)
    device = next(model.parameters()).device
    p = model.patch_size
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {k: [] for k in ("patches", "pixels", "norms", "cls", "registers")}
    grid = None
    try:
        for x in track(_batches(images, batch_size), f"tokens of layer {block}"):
            x = x.to(device)
            cls, regs, patches = model.layout.split(model.forward_intermediates(x, [block])[block].tokens)
            parts["norms"].append(patches.float().norm(dim=-1).cpu())
            if features == "normed":
                patches, cls, regs = model.norm(patches), model.norm(cls), model.norm(regs)
            parts["patches"].append(patches.float().cpu())
            parts["cls"].append(cls.float().cpu())
            parts["registers"].append(regs.float().cpu())
            parts["pixels"].append(patch_pixels(x.float(), p).cpu())
            grid = (x.shape[-2] // p, x.shape[-1] // p)
    finally:
        model.train(was_training)
    if grid is None:
        raise ValueError("collect_tokens got no images")
    data = {k: torch.cat(v) for k, v in parts.items()}
    threshold = outlier_threshold(data["norms"], detector, cutoff=cutoff, settings=settings)
    return TokenSet(
        outliers=data["norms"] > threshold,
        grid=grid,
        threshold=threshold,
        detector=detector,
        layer=block,
        features=features,
        **data,
    )


# ------------------------------------------------------------------------------------------ helpers


def split_images(num_images: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded disjoint (train, test) image indices; each side gets at least one image."""
    if num_images < 2:
        raise ValueError(f"a train/test split by image needs at least 2 images, got {num_images}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    n_test = min(max(1, round(test_fraction * num_images)), num_images - 1)
    return order[n_test:].sort().values, order[:n_test].sort().values


def grid_coordinates(grid: tuple[int, int]) -> Tensor:
    """(P, 2) float64 (row, column) of each patch index, row-major."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1).double()


def uniform_mean_distance(grid: tuple[int, int]) -> float:
    """Expected Euclidean distance (in patches) between two independent uniform grid positions:
    the mean distance of a position guess that ignores the token."""
    xy = grid_coordinates(grid)
    return float(torch.cdist(xy, xy).mean())


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _choose_alpha(X: Tensor, Y: Tensor, alpha: float | str, groups: Tensor, score, seed: int) -> float:
    if alpha == "auto":
        folds = min(3, len(torch.unique(groups)))
        if folds < 2:  # a single training image cannot be cross-validated: fall back to a mild penalty
            return 1.0
        return select_alpha(X, Y, RIDGE_GRID, score=score, groups=groups, folds=folds, seed=seed)[0]
    if isinstance(alpha, str) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0 or 'auto', got {alpha!r}")
    return float(alpha)


def _rows(tokens: TokenSet, images: Tensor, targets: str) -> dict[str, Tensor]:
    """Flattened per-token rows of the given images: features, target ("position" or "pixels"),
    outlier flag and image id."""
    n, p = len(images), tokens.num_patches
    target = torch.arange(p).repeat(n) if targets == "position" else tokens.pixels[images].reshape(n * p, -1)
    return {
        "x": tokens.patches[images].reshape(n * p, -1),
        "target": target,
        "outlier": tokens.outliers[images].reshape(-1),
        "image": images.repeat_interleave(p),
    }


def _header(tokens: TokenSet, train: Tensor, test: Tensor) -> dict:
    return {
        "layer": tokens.layer,
        "features": tokens.features,
        "detector": tokens.detector,
        "threshold": _json_float(tokens.threshold),
        "outlier_fraction": float(tokens.outliers.double().mean()),
        "grid": list(tokens.grid),
        "num_images": tokens.num_images,
        "num_train_images": len(train),
        "num_test_images": len(test),
    }


def _too_few(count: int, min_outliers: int, where: str) -> str | None:
    if count >= min_outliers:
        return None
    return f"only {count} outlier tokens in the {where} (< min_outliers={min_outliers}); outlier entries are null"


def _local_probe(
    tokens: TokenSet,
    targets: str,
    fit: Callable[[Tensor, Tensor, Tensor], tuple[object, float]],
    evaluate: Callable[[object, Tensor, Tensor], dict],
    *,
    fit_on: str,
    test_fraction: float,
    seed: int,
    min_outliers: int,
) -> dict:
    """Shared split / grouping logic: ``fit(x, target, image_ids) -> (model, alpha)`` on training
    tokens, ``evaluate(model, x, target) -> dict`` on the test tokens of each group."""
    if fit_on not in FIT_ON:
        raise ValueError(f"fit_on must be one of {FIT_ON}, got {fit_on!r}")
    train, test = split_images(tokens.num_images, test_fraction, seed)
    tr, te = _rows(tokens, train, targets), _rows(tokens, test, targets)
    masks = {
        "train": {"normal": ~tr["outlier"], "outlier": tr["outlier"]},
        "test": {"normal": ~te["outlier"], "outlier": te["outlier"]},
    }
    note = _too_few(int(te["outlier"].sum()), min_outliers, "test images")
    out: dict = {"fit_on": fit_on}
    if fit_on == "all":
        model, out["alpha"] = fit(tr["x"], tr["target"], tr["image"])
        models = dict.fromkeys(GROUPS, model)
    else:
        note = note or _too_few(int(tr["outlier"].sum()), min_outliers, "training images")
        models, out["alpha"] = {}, {}
        for group in GROUPS if not note else ("normal",):
            m = masks["train"][group]
            models[group], out["alpha"][group] = fit(tr["x"][m], tr["target"][m], tr["image"][m])
    for group in GROUPS:
        if group == "outlier" and note:
            out[group] = None
            continue
        m = masks["test"][group]
        out[group] = {**evaluate(models[group], te["x"][m], te["target"][m]), "count": int(m.sum())}
    if note:
        out["note"] = note
    return out


# ------------------------------------------------------------------------------------------ local probes


def position_probe(
    tokens: TokenSet,
    *,
    fit_on: str = "all",
    alpha: float | str = "auto",
    test_fraction: float = 0.3,
    seed: int = 0,
    min_outliers: int = 10,
) -> dict:
    """Linear position classifier (ridge on one-hot positions): top-1 (%) and mean Euclidean grid
    distance (patches) between predicted and true position, per token group on the test images."""
    p = tokens.num_patches
    xy = grid_coordinates(tokens.grid)

    def fit(x: Tensor, position: Tensor, images: Tensor) -> tuple[tuple[Tensor, Tensor], float]:
        onehot = torch.nn.functional.one_hot(position, p).double()
        a = _choose_alpha(x, onehot, alpha, images, accuracy, seed)
        return ridge_classifier(x, position, a, num_classes=p), a

    def evaluate(model: tuple[Tensor, Tensor], x: Tensor, position: Tensor) -> dict:
        pred = classify(x, *model)
        return {
            "top1": 100.0 * float((pred == position).double().mean()),
            "mean_distance": float((xy[pred] - xy[position]).norm(dim=1).mean()),
        }

    out = _local_probe(
        tokens,
        "position",
        fit,
        evaluate,
        fit_on=fit_on,
        test_fraction=test_fraction,
        seed=seed,
        min_outliers=min_outliers,
    )
    return {**out, "chance_top1": 100.0 / p, "chance_mean_distance": uniform_mean_distance(tokens.grid)}


def reconstruction_probe(
    tokens: TokenSet,
    *,
    fit_on: str = "all",
    alpha: float | str = "auto",
    test_fraction: float = 0.3,
    seed: int = 0,
    min_outliers: int = 10,
) -> dict:
    """Ridge regression token -> its patch's normalised pixels (3·p·p values), per token group.

    Per test patch i with prediction ŷ_i and pixels y_i (M = 3·p·p values):
    ``mse = mean_i (1/M) Σ_j (ŷ_ij - y_ij)²``; ``l2 = mean_i ||ŷ_i - y_i||₂``; ``baseline_mse`` is
    the mse of always predicting the mean training patch (of the tokens the model was fitted on):
    what a token without pixel information can do at best, about the pixel variance.
    """

    def fit(x: Tensor, pixels: Tensor, images: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], float]:
        pixels = pixels.double()
        a = _choose_alpha(x, pixels, alpha, images, neg_mse, seed)
        return (*fit_ridge(x, pixels, a), pixels.mean(0)), a

    def evaluate(model: tuple[Tensor, Tensor, Tensor], x: Tensor, pixels: Tensor) -> dict:
        W, b, mean_patch = model
        pixels = pixels.double()
        err = predict(x, W, b) - pixels
        return {
            "mse": float(err.pow(2).mean(1).mean()),
            "l2": float(err.norm(dim=1).mean()),
            "baseline_mse": float((pixels - mean_patch).pow(2).mean(1).mean()),
        }

    out = _local_probe(
        tokens,
        "pixels",
        fit,
        evaluate,
        fit_on=fit_on,
        test_fraction=test_fraction,
        seed=seed,
        min_outliers=min_outliers,
    )
    return {**out, "num_values": tokens.pixels.shape[-1]}


def local_probes(
    tokens: TokenSet,
    *,
    fit_on: str = "all",
    alpha: float | str = "auto",
    test_fraction: float = 0.3,
    seed: int = 0,
    min_outliers: int = 10,
) -> dict:
    """Position and reconstruction probes on one split, with the outlier definition used."""
    train, test = split_images(tokens.num_images, test_fraction, seed)
    kw = {"fit_on": fit_on, "alpha": alpha, "test_fraction": test_fraction, "seed": seed, "min_outliers": min_outliers}
    return {
        **_header(tokens, train, test),
        "position": position_probe(tokens, **kw),
        "reconstruction": reconstruction_probe(tokens, **kw),
    }


# ------------------------------------------------------------------------------------------ global probe


def _random_token(tokens: TokenSet, group_mask: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One uniformly random token of ``group_mask`` per image: features (N, D) and a has-one flag (N,)."""
    draw = torch.rand(group_mask.shape, generator=generator, dtype=torch.float64)
    pick = torch.where(group_mask, draw, torch.full_like(draw, -1.0)).argmax(dim=1)
    return tokens.patches[torch.arange(tokens.num_images), pick], group_mask.any(dim=1)


def _classify_top1(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    classifier: str,
    strength: float | str,
    num_classes: int,
    max_iter: int,
    seed: int,
) -> tuple[float, float]:
    """Top-1 (%) on the test rows and the regularisation value used."""
    if classifier == "logistic":
        fit, grid, targets = logistic_fit(num_classes, max_iter), C_GRID, y_train
    else:
        fit, grid = None, RIDGE_GRID  # ridge on one-hot targets, swept from one eigendecomposition
        targets = torch.nn.functional.one_hot(y_train, num_classes).double()
    if strength == "auto":
        folds = min(3, len(y_train))
        strength = select_alpha(x_train, targets, grid, fit=fit, score=accuracy, folds=folds, seed=seed)[0]
    if classifier == "logistic":
        W, b = logistic_regression(x_train, y_train, C=float(strength), max_iter=max_iter, num_classes=num_classes)
    else:
        W, b = ridge_classifier(x_train, y_train, float(strength), num_classes=num_classes)
    return 100.0 * accuracy(x_test, y_test, W, b), float(strength)


def global_probe(
    tokens: TokenSet,
    labels: Tensor,
    *,
    classifier: str = "logistic",
    C: float | str = "auto",
    alpha: float | str = "auto",
    repeats: int = 5,
    test_fraction: float = 0.3,
    seed: int = 0,
    min_outliers: int = 10,
    max_iter: int = 1000,
) -> dict:
    """Image-label classification from one token per image (Table 1): ``cls``, ``normal`` (a random
    normal patch), ``outlier`` (a random outlier patch, images that have one), ``register_i``.

    Returns ``{"global": {kind: {"top1", "std", "count", "test_count", "C" | "alpha"} | None}, ...}``
    with top-1 in percent (mean over ``repeats`` for the random kinds), ``count`` the images used and
    ``test_count`` those among the test images. ``C`` (logistic) or ``alpha`` (ridge) is the
    regularisation, a number or "auto" (3-fold CV on the training images, per kind, on the first
    draw for the random kinds; the value used is reported). The outlier entry is null (with a
    ``note``) unless at least ``min_outliers`` images have an outlier patch, >= 2 of them in training
    and >= 1 in test. ``chance_top1`` is the majority-class rate of the test images.
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    labels = torch.as_tensor(labels).long()
    if labels.shape != (tokens.num_images,):
        raise ValueError(f"labels must have one entry per image ({tokens.num_images}), got shape {tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1
    train, test = split_images(tokens.num_images, test_fraction, seed)
    is_train = torch.zeros(tokens.num_images, dtype=torch.bool)
    is_train[train] = True
    strength, reg_name = (C, "C") if classifier == "logistic" else (alpha, "alpha")
    kw = {"classifier": classifier, "num_classes": num_classes, "max_iter": max_iter}

    # one classifier per fit: CLS, `repeats` normal and outlier draws, each register
    fits = TaskProgress("global probe classifiers", 1 + 2 * repeats + tokens.registers.shape[1], "fits")

    def run(features: Tensor, usable: Tensor, strength: float | str) -> tuple[float, float, int, int]:
        tr, te = usable & is_train, usable & ~is_train
        top1, used = _classify_top1(
            features[tr], labels[tr], features[te], labels[te], strength=strength, seed=seed, **kw
        )
        fits.update()
        return top1, used, int(usable.sum()), int(te.sum())

    def repeated(group_mask: Tensor) -> list[tuple[float, float, int, int]]:
        # "auto" regularisation is chosen on the first draw and kept for the others (saves the sweeps)
        results = [run(*_random_token(tokens, group_mask, generator), strength)]
        results += [run(*_random_token(tokens, group_mask, generator), results[0][1]) for _ in range(repeats - 1)]
        return results

    def summary(results: list[tuple[float, float, int, int]]) -> dict:
        top1 = torch.tensor([r[0] for r in results], dtype=torch.float64)
        return {
            "top1": float(top1.mean()),
            "std": float(top1.std(unbiased=False)),
            "count": results[0][2],
            "test_count": results[0][3],
            reg_name: results[0][1],
        }

    everyone = torch.ones(tokens.num_images, dtype=torch.bool)
    out: dict = {"cls": summary([run(tokens.cls, everyone, strength)])}
    generator = torch.Generator().manual_seed(seed)
    notes = []
    for group, mask in (("normal", ~tokens.outliers), ("outlier", tokens.outliers)):
        has = mask.any(dim=1)
        enough = (has & is_train).sum() >= 2 and (has & ~is_train).sum() >= 1 and int(has.sum()) >= min_outliers
        if group == "outlier" and not enough:
            out[group] = None
            fits.update(repeats)  # not fitted: counted as done
            notes.append(
                f"{int(has.sum())} images have an outlier patch ({int((has & is_train).sum())} train, "
                f"{int((has & ~is_train).sum())} test; need >= {min_outliers}, >= 2 train and >= 1 test): "
                "the outlier entry is null"
            )
            continue
        out[group] = summary(repeated(mask))
    for i in range(tokens.registers.shape[1]):
        out[f"register_{i}"] = summary([run(tokens.registers[:, i], everyone, strength)])
    fits.close()
    result = {
        "global": out,
        "classifier": classifier,
        "repeats": repeats,
        "num_classes": num_classes,
        "chance_top1": 100.0 * float(torch.bincount(labels[~is_train]).max()) / int((~is_train).sum()),
        **_header(tokens, train, test),
    }
    if notes:
        result["note"] = "; ".join(notes)
    return result


# ------------------------------------------------------------------------------------------ plot


def plot_token_probes(results: dict, path: str | os.PathLike) -> Path:
    """Bar charts of normal vs outlier (and CLS / registers for the global probe) to a PNG at ``path``.

    ``results``: the dict of ``local_probes``, of ``global_probe``, or both merged into one dict.
    A null (too few outliers) entry shows as an empty slot labelled "n/a".
    """
    from vitreg.utils import figures  # matplotlib is imported only when plotting

    panels = []
    if results.get("position"):
        panels.append(("position top-1 (%) ↑", results["position"], "top1", None))
        panels.append(("position mean distance (patches) ↓", results["position"], "mean_distance", None))
    if results.get("reconstruction"):
        panels.append(("reconstruction MSE ↓", results["reconstruction"], "mse", None))
    if results.get("global"):
        panels.append(("global top-1 (%) ↑", results["global"], "top1", "std"))
    if not panels:
        raise ValueError("plot_token_probes: results hold no 'position', 'reconstruction' or 'global' entry")
    fig = figures.new_figure(3.2 * len(panels), 3.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, block, key, err_key) in zip(axes, panels, strict=True):
        kinds = list(block) if err_key else list(GROUPS)
        heights = [block[k][key] if block[k] else 0.0 for k in kinds]
        errors = [block[k].get(err_key, 0.0) if block[k] and err_key else 0.0 for k in kinds]
        colours = ["tab:red" if k == "outlier" else "tab:blue" if k == "normal" else "tab:gray" for k in kinds]
        ax.bar(range(len(kinds)), heights, yerr=errors if err_key else None, color=colours, capsize=3)
        for i, k in enumerate(kinds):
            if block[k] is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        if key == "top1" and "chance_top1" in (results if err_key else block):
            ax.axhline((results if err_key else block)["chance_top1"], color="k", ls=":", lw=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
    return figures.save(fig, path)

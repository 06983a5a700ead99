"""LOST single-object discovery (Siméoni et al., BMVC 2021) for ViTs with registers, scored by CorLoc.

Steps, as LOST's ``main_lost.py`` / ``object_discovery.py`` run them:

1. The full-resolution image, ImageNet-normalised and **not resized**, zero-padded right/bottom (in
   normalised space, as LOST) to a multiple of the patch size P: a grid of ceil(H/P) x ceil(W/P) patches.
2. Features of one block: keys (default), queries or values from a forward hook on that block's fused
   ``attn.qkv`` (heads concatenated), or the block's output tokens (``"out"``, after the final LayerNorm
   as ``get_intermediate_layers`` gives them). Only patches: tokens ``1 + R:``. LOST's ``k[:, 1:]``
   drops CLS only and would treat the R registers as patches; here registers never enter the grid.
3. ``A = f fᵀ + gram_bias`` (Darcet et al. add a bias to the Gram matrix; 0 is LOST).
4. degree = number of positive entries per row with the diagonal ignored; the seed is the
   lowest-degree patch; ties go to the lowest patch index (a stable sort; LOST's order is unspecified).
5. The ``k_patches`` lowest-degree patches that are positive with the seed are its "similars";
   ``M = Σ_s A[s, :]``.
6. The 4-connected component of ``M > 0`` that holds the seed; its bounding box times P, clipped to the
   unpadded image, is the prediction (pixel boxes ``(x0, y0, x1, y1)``, x1/y1 exclusive, see ``boxes``).

Fallback (not in LOST, which raises): when the seed is not inside a positive component of M (possible
with a negative bias, or a seed with no positive similars), the prediction is the seed's own patch and
the image is counted in ``fallbacks``.

CorLoc is over the images that could be decoded; unreadable images are skipped and counted
(``skipped_images``), never scored, so every model is compared on the same set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitreg.data.decode import DecodeError, decode_image
from vitreg.data.transforms import normalize as imagenet_normalize
from vitreg.eval.boxes import Box, BoxedImage, best_iou, load_box_dataset
from vitreg.eval.progress import TaskProgress

FEATURE_KINDS: tuple[str, ...] = ("k", "q", "v", "out")
NORMALIZATIONS: tuple[str, ...] = ("none", "l2", "center", "center_l2")
CORLOC_THRESHOLD = 0.5


@dataclass
class LostSettings:
    """The ``lost`` section of conf/analyze.yaml: LOST object discovery and its CorLoc."""

    dataset: str | None = None  # VOC root (Annotations/ + JPEGImages/), boxes .json or .csv; null: generated images
    image_set: str | None = None  # VOC ImageSets/Main/<image_set>.txt, e.g. trainval
    no_hard: bool = False  # drop VOC images whose objects are all difficult or truncated
    limit: int | None = None
    layer: int = -1  # block whose features build the patch graph
    kind: str = "k"  # one of FEATURE_KINDS
    normalize: str = "none"  # one of NORMALIZATIONS
    gram_bias: float = 0.0
    k_patches: int = 100
    max_side: int | None = None  # downscale larger images (LOST: none)
    sweep: bool = False  # also CorLoc over sweep_layers x sweep_kinds x sweep_biases x sweep_normalize
    sweep_layers: list[int] = field(default_factory=lambda: [-1, -2, -3, -4])
    sweep_kinds: list[str] = field(default_factory=lambda: ["k", "q", "v"])
    sweep_biases: list[float] = field(default_factory=lambda: [0.0])
    sweep_normalize: list[str] = field(default_factory=lambda: ["none"])
    num_examples: int = 8  # images drawn with their boxes in lost_examples.png
    generated_images: int = 32  # with dataset=null: images with one known object each


@dataclass
class LostResult:
    """LOST's answer on one feature grid; patch indices are row-major over the (h, w) grid."""

    seed: int
    seed_rc: tuple[int, int]
    mask: Tensor  # (h, w) bool: the seed's component of M > 0 (only the seed patch on fallback)
    box_patches: tuple[int, int, int, int]  # (r0, c0, r1, c1), r1/c1 exclusive
    fallback: bool
    degree: Tensor  # (P,) number of positive off-diagonal Gram entries per patch


@dataclass
class PreparedImage:
    """A normalised, padded image ready for the model, and how to map boxes back to the original."""

    tensor: Tensor  # (3, Hp, Wp), Hp and Wp multiples of the patch size
    image_hw: tuple[int, int]  # size of the (possibly downscaled) image inside the padding
    original_hw: tuple[int, int]  # size of the input image; predictions are given in these pixels

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.tensor.shape[-2], self.tensor.shape[-1]


# ---------------------------------------------------------------- input
def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def prepare_image(image: Tensor, patch_size: int, *, max_side: int | None = None) -> PreparedImage:
    """LOST's input: a uint8 RGB ``(3, H, W)`` image (scaled to [0, 1] and ImageNet-normalised here) or an
    already normalised float one, zero-padded right/bottom to multiples of ``patch_size``. No resize,
    unless ``max_side`` is set and the longer side exceeds it (then bicubic, antialiased, aspect kept).
    """
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"expected one RGB image of shape (3, H, W), got {got}; decode with decode_image first")
    if max_side is not None and max_side < patch_size:
        raise ValueError(f"max_side must be >= patch_size {patch_size} (or None for no resize), got {max_side}")
    original_hw = (image.shape[1], image.shape[2])
    is_uint8 = image.dtype == torch.uint8
    x = image.float() / 255.0 if is_uint8 else image.float()
    if max_side is not None and max(original_hw) > max_side:
        scale = max_side / max(original_hw)
        size = tuple(max(1, round(s * scale)) for s in original_hw)
        x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
        if is_uint8:
            x = x.clamp(0.0, 1.0)
    if is_uint8:
        x = imagenet_normalize(x)
    h, w = x.shape[1], x.shape[2]
    padded = x.new_zeros(3, math.ceil(h / patch_size) * patch_size, math.ceil(w / patch_size) * patch_size)
    padded[:, :h, :w] = x
    return PreparedImage(padded, (h, w), original_hw)


def load_rgb(path: str | Path) -> Tensor:
    """An image file as a uint8 RGB ``(3, H, W)`` tensor; raises ``DecodeError`` / ``OSError`` when unusable."""
    return decode_image(Path(path).read_bytes())


# ---------------------------------------------------------------- features
@torch.no_grad()
def capture_features(
    model: nn.Module, images: Tensor, requests: Iterable[tuple[int, str]]
) -> dict[tuple[int, str], Tensor]:
    """Patch features ``(B, P, C)`` for each ``(layer, kind)`` request from a single forward pass.

    Keys are the resolved (non-negative) block indices. q/k/v are the block's qkv projection
    (``forward_intermediates(qkv=...)``), ``out`` its output tokens through the final LayerNorm.
    Registers and CLS are always excluded.
    """
    wanted = []
    for layer, kind in requests:
        _check_choice("kind", kind, FEATURE_KINDS)
        key = (model.resolve_block(layer), kind)
        if key not in wanted:
            wanted.append(key)
    if not wanted:
        raise ValueError("no (layer, kind) feature requested")
    layers = sorted({lay for lay, _ in wanted})
    qkv_layers = sorted({lay for lay, kind in wanted if kind != "out"})
    outputs = model.forward_intermediates(images, layers, norm=True, qkv=qkv_layers)
    patches = model.layout.patches
    feats = {}
    for layer, kind in wanted:
        if kind == "out":
            feats[(layer, kind)] = patches(outputs[layer].tokens).float()
        else:
            feats[(layer, kind)] = patches(outputs[layer].qkv)[:, :, "qkv".index(kind)].float()
    return feats


def token_features(model: nn.Module, images: Tensor, *, layer: int = -1, kind: str = "k") -> Tensor:
    """Patch features ``(B, P, C)`` of block ``layer``: keys/queries/values (heads concatenated) or the
    block's normalised output tokens (``out``). Registers and CLS are never included."""
    return capture_features(model, images, [(layer, kind)])[(model.resolve_block(layer), kind)]


# ---------------------------------------------------------------- connected components
def connected_components(mask: Tensor) -> tuple[Tensor, int]:
    """4-connected components of a 2-D bool mask: labels (h, w) int64 (0 = outside the mask, 1..n in
    row-major order of each component's first cell, as ``scipy.ndimage.label``) and n."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {tuple(mask.shape)}")
    h, w = mask.shape
    cells = mask.bool().cpu().reshape(-1).tolist()
    labels = [0] * (h * w)
    count = 0
    for start in range(h * w):
        if not cells[start] or labels[start]:
            continue
        count += 1
        labels[start] = count
        stack = [start]
        while stack:
            i = stack.pop()
            r, c = divmod(i, w)
            for j, inside in ((i - w, r > 0), (i + w, r < h - 1), (i - 1, c > 0), (i + 1, c < w - 1)):
                if inside and cells[j] and not labels[j]:
                    labels[j] = count
                    stack.append(j)
    return torch.tensor(labels, dtype=torch.int64).reshape(h, w), count


# ---------------------------------------------------------------- LOST
def gram_matrix(feats: Tensor, normalize: str = "none", gram_bias: float = 0.0) -> Tensor:
    """``A = f fᵀ + gram_bias`` (P, P) in float32 after the chosen feature normalisation:
    ``none`` (LOST), ``l2`` (unit rows), ``center`` (minus the mean patch), ``center_l2`` (both, in that order)."""
    _check_choice("normalize", normalize, NORMALIZATIONS)
    if feats.ndim != 2:
        raise ValueError(f"expected features (P, C) for one image, got shape {tuple(feats.shape)}")
    f = feats.float()
    if normalize in ("center", "center_l2"):
        f = f - f.mean(dim=0, keepdim=True)
    if normalize in ("l2", "center_l2"):
        f = F.normalize(f, dim=1)
    return f @ f.T + gram_bias


def lost_from_gram(gram: Tensor, grid_hw: tuple[int, int], *, k_patches: int = 100) -> LostResult:
    """LOST's seed selection, expansion and box on a precomputed (biased) Gram matrix."""
    h, w = grid_hw
    n = gram.shape[0]
    if gram.shape != (n, n) or n != h * w:
        raise ValueError(f"Gram matrix {tuple(gram.shape)} does not match a {h}x{w} grid ({h * w} patches)")
    if k_patches < 1:
        raise ValueError(f"k_patches must be >= 1, got {k_patches}")
    positive = gram > 0
    positive.fill_diagonal_(False)
    degree = positive.sum(dim=1)
    order = torch.sort(degree, stable=True).indices
    seed = int(order[0])
    potentials = order[:k_patches]
    similars = potentials[gram[seed, potentials] > 0]
    m = gram[similars].sum(dim=0).reshape(h, w)
    labels, _ = connected_components(m > 0)
    seed_rc = divmod(seed, w)
    label = int(labels[seed_rc])
    fallback = label == 0
    if fallback:
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[seed_rc] = True
    else:
        mask = labels == label
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return LostResult(seed, seed_rc, mask, box, fallback, degree.cpu())


def lost(
    feats: Tensor,
    grid_hw: tuple[int, int],
    *,
    k_patches: int = 100,
    normalize: str = "none",
    gram_bias: float = 0.0,
) -> LostResult:
    """LOST on one image's patch features ``(P, C)`` laid out row-major on a ``grid_hw`` grid."""
    return lost_from_gram(gram_matrix(feats, normalize, gram_bias), grid_hw, k_patches=k_patches)


def patch_box_to_pixels(box_patches: tuple[int, int, int, int], patch_size: int, image_hw: tuple[int, int]) -> Box:
    """A patch box (r0, c0, r1, c1) as pixels (x0, y0, x1, y1), clipped to the unpadded ``image_hw``."""
    r0, c0, r1, c1 = box_patches
    h, w = image_hw
    return (
        float(c0 * patch_size),
        float(r0 * patch_size),
        float(min(c1 * patch_size, w)),
        float(min(r1 * patch_size, h)),
    )


def _to_original(box: Box, prepared: PreparedImage) -> Box:
    """Undo a ``max_side`` downscale: resized-image pixels to original-image pixels."""
    (h, w), (oh, ow) = prepared.image_hw, prepared.original_hw
    if (h, w) == (oh, ow):
        return box
    sx, sy = ow / w, oh / h
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, min(x1 * sx, float(ow)), min(y1 * sy, float(oh)))


# ---------------------------------------------------------------- one image
@dataclass
class Discovery:
    """LOST's box and seed patch in original-image pixels, with the grid-level result."""

    box: Box
    seed_box: Box
    result: LostResult


@dataclass(frozen=True)
class LostSetting:
    layer: int  # resolved, non-negative block index
    kind: str
    normalize: str
    gram_bias: float

    def as_dict(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "normalize": self.normalize, "gram_bias": self.gram_bias}


def _settings(
    model: nn.Module,
    layers: Sequence[int],
    kinds: Sequence[str],
    biases: Sequence[float],
    normalizations: Sequence[str],
) -> list[LostSetting]:
    for name, values in (("layers", layers), ("kinds", kinds), ("biases", biases), ("normalizations", normalizations)):
        if len(values) == 0:
            raise ValueError(f"{name} is empty; give at least one value")
    for kind in kinds:
        _check_choice("kind", kind, FEATURE_KINDS)
    for norm in normalizations:
        _check_choice("normalize", norm, NORMALIZATIONS)
    resolved_layers = list(dict.fromkeys(model.resolve_block(layer, "layers") for layer in layers))
    settings = [
        LostSetting(layer, kind, norm, float(bias))
        for layer in resolved_layers
        for kind in dict.fromkeys(kinds)
        for norm in dict.fromkeys(normalizations)
        for bias in dict.fromkeys(biases)
    ]
    return settings


@torch.no_grad()
def _discover_all(
    model: nn.Module,
    image: Tensor,
    settings: Sequence[LostSetting],
    *,
    k_patches: int,
    max_side: int | None,
    device: torch.device,
) -> list[Discovery]:
    """Boxes (original pixels) for every setting; one forward, one Gram per (layer, kind, normalisation)."""
    p = model.patch_size
    prepared = prepare_image(image, p, max_side=max_side)
    grid_hw = (prepared.grid_hw[0] // p, prepared.grid_hw[1] // p)
    feats = capture_features(model, prepared.tensor[None].to(device), {(s.layer, s.kind) for s in settings})
    grams: dict[tuple[int, str, str], Tensor] = {}
    answers = []
    for s in settings:
        key = (s.layer, s.kind, s.normalize)
        if key not in grams:
            grams[key] = gram_matrix(feats[(s.layer, s.kind)][0], s.normalize)
        result = lost_from_gram(grams[key] + s.gram_bias, grid_hw, k_patches=k_patches)
        box = _to_original(patch_box_to_pixels(result.box_patches, p, prepared.image_hw), prepared)
        r, c = result.seed_rc
        seed_box = _to_original(patch_box_to_pixels((r, c, r + 1, c + 1), p, prepared.image_hw), prepared)
        answers.append(Discovery(box, seed_box, result))
    return answers


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def discover(
    model: nn.Module,
    image: Tensor,
    *,
    layer: int = -1,
    kind: str = "k",
    normalize: str = "none",
    gram_bias: float = 0.0,
    k_patches: int = 100,
    max_side: int | None = None,
    device: str | torch.device | None = None,
) -> Box:
    """LOST's box ``(x0, y0, x1, y1)`` in the pixels of ``image`` (uint8 RGB or normalised float (3, H, W))."""
    was_training = model.training
    model.eval()
    try:
        settings = _settings(model, [layer], [kind], [gram_bias], [normalize])
        dev = _model_device(model, device)
        [found] = _discover_all(model, image, settings, k_patches=k_patches, max_side=max_side, device=dev)
    finally:
        model.train(was_training)
    return found.box


# ---------------------------------------------------------------- datasets
def _as_dataset(dataset: Sequence[BoxedImage] | str | Path, limit: int | None) -> list[BoxedImage]:
    if isinstance(dataset, (str, Path)):
        return load_box_dataset(dataset, limit=limit)
    images = list(dataset)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all images), got {limit}")
        images = images[:limit]
    if not images:
        raise ValueError("the dataset has no images; pass BoxedImages with ground-truth boxes")
    return images


def _run(
    model: nn.Module,
    dataset: Sequence[BoxedImage] | str | Path,
    settings: list[LostSetting],
    *,
    k_patches: int,
    device: str | torch.device | None,
    limit: int | None,
    max_side: int | None,
    progress: bool,
) -> dict:
    """Every setting on every image: per-setting lists of (file, box, best IoU, fallback), plus skips."""
    if k_patches < 1:
        raise ValueError(f"k_patches must be >= 1, got {k_patches}")
    images = _as_dataset(dataset, limit)
    dev = _model_device(model, device)
    per_setting: list[list[dict]] = [[] for _ in settings]
    skipped: list[dict] = []
    was_training = model.training
    model.eval()
    # progress=False (library default): silent; True: the reporting train/analyze.py set (bar or lines)
    report = TaskProgress("LOST", len(images), "images", mode=None if progress else "off")
    try:
        for item in images:
            report.update()
            try:
                image = load_rgb(item.path)
            except (OSError, DecodeError) as err:
                skipped.append({"file": str(item.path), "error": str(err)})
                continue
            answers = _discover_all(model, image, settings, k_patches=k_patches, max_side=max_side, device=dev)
            for records, found in zip(per_setting, answers, strict=True):
                records.append(
                    {
                        "file": str(item.path),
                        "pred": [float(v) for v in found.box],
                        "best_iou": best_iou(found.box, item.boxes),
                        "fallback": found.result.fallback,
                    }
                )
    finally:
        report.close()
        model.train(was_training)
    if not per_setting[0]:
        raise ValueError(
            f"none of the {len(images)} images could be decoded, e.g. {skipped[0]['file']}: {skipped[0]['error']}"
        )
    return {"per_setting": per_setting, "skipped": skipped}


def _summary(records: list[dict]) -> dict:
    hits = sum(r["best_iou"] >= CORLOC_THRESHOLD for r in records)
    return {"corloc": 100.0 * hits / len(records), "fallbacks": sum(r["fallback"] for r in records)}


def evaluate_lost(
    model: nn.Module,
    dataset: Sequence[BoxedImage] | str | Path,
    *,
    layer: int = -1,
    kind: str = "k",
    normalize: str = "none",
    gram_bias: float = 0.0,
    k_patches: int = 100,
    device: str | torch.device | None = None,
    limit: int | None = None,
    max_side: int | None = None,
    progress: bool = False,
    per_image: bool = True,
) -> dict:
    """CorLoc (%) of LOST with one setting on a box dataset (``BoxedImage`` list or a path for
    ``load_box_dataset``); ``device`` None means the model's device. A JSON-ready dict."""
    settings = _settings(model, [layer], [kind], [gram_bias], [normalize])
    run = _run(
        model, dataset, settings, k_patches=k_patches, device=device, limit=limit, max_side=max_side, progress=progress
    )
    records = run["per_setting"][0]
    result = {
        **_summary(records),
        "num_images": len(records),
        "skipped_images": len(run["skipped"]),
        "skipped": run["skipped"][:20],
        "settings": {
            **settings[0].as_dict(),
            "k_patches": k_patches,
            "max_side": max_side,
            "patch_size": model.patch_size,
            "num_register_tokens": model.num_register_tokens,
        },
    }
    if per_image:
        result["per_image"] = records
    return result


def sweep_lost(
    model: nn.Module,
    dataset: Sequence[BoxedImage] | str | Path,
    *,
    layers: Sequence[int] = (-1,),
    kinds: Sequence[str] = ("k",),
    biases: Sequence[float] = (0.0,),
    normalizations: Sequence[str] = ("none",),
    k_patches: int = 100,
    device: str | torch.device | None = None,
    limit: int | None = None,
    max_side: int | None = None,
    progress: bool = False,
) -> dict:
    """CorLoc of every (layer, kind, normalisation, bias) combination and the best one.

    Bias, feature type and layer dominate LOST numbers, so report the sweep. Each image is forwarded
    once; each (layer, kind, normalisation) Gram matrix is computed once and reused for every bias.
    """
    settings = _settings(model, layers, kinds, biases, normalizations)
    run = _run(
        model, dataset, settings, k_patches=k_patches, device=device, limit=limit, max_side=max_side, progress=progress
    )
    rows = [{**s.as_dict(), **_summary(records)} for s, records in zip(settings, run["per_setting"], strict=True)]
    best = max(rows, key=lambda row: row["corloc"])  # first of equals: the earliest setting in sweep order
    return {
        "settings": rows,
        "best": dict(best),
        "num_images": len(run["per_setting"][0]),
        "skipped_images": len(run["skipped"]),
        "skipped": run["skipped"][:20],
        "k_patches": k_patches,
        "max_side": max_side,
        "patch_size": model.patch_size,
        "num_register_tokens": model.num_register_tokens,
    }


# ---------------------------------------------------------------- pictures
def plot_lost_examples(
    model: nn.Module,
    dataset: Sequence[BoxedImage] | str | Path,
    path: str | Path,
    *,
    num_images: int = 4,
    layer: int = -1,
    kind: str = "k",
    normalize: str = "none",
    gram_bias: float = 0.0,
    k_patches: int = 100,
    max_side: int | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """A PNG of the first ``num_images`` readable images with GT boxes (green), LOST's box (red) and
    its seed patch (yellow). matplotlib is imported here only, on an Agg canvas (pyplot untouched)."""
    from matplotlib.patches import Rectangle

    from vitreg.utils.figures import new_figure, save

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    settings = _settings(model, [layer], [kind], [gram_bias], [normalize])
    dev = _model_device(model, device)
    shown = []
    was_training = model.training
    model.eval()
    try:
        for item in _as_dataset(dataset, None):
            if len(shown) == num_images:
                break
            try:
                image = load_rgb(item.path)
            except (OSError, DecodeError):
                continue
            [found] = _discover_all(model, image, settings, k_patches=k_patches, max_side=max_side, device=dev)
            shown.append((item, image, found))
    finally:
        model.train(was_training)
    if not shown:
        raise ValueError("no image of the dataset could be decoded; nothing to plot")
    fig = new_figure(3.2 * len(shown), 3.4)

    def rectangle(box: Box, **style) -> Rectangle:
        return Rectangle(box[:2], box[2] - box[0], box[3] - box[1], **style)

    for ax, (item, image, found) in zip(fig.subplots(1, len(shown), squeeze=False)[0], shown, strict=True):
        ax.imshow(image.permute(1, 2, 0).numpy())
        for gt in item.boxes:
            ax.add_patch(rectangle(gt, fill=False, edgecolor="lime", linewidth=2))
        ax.add_patch(rectangle(found.box, fill=False, edgecolor="red", linewidth=2))
        ax.add_patch(rectangle(found.seed_box, color="yellow", alpha=0.6))
        title = f"{Path(item.path).name}\nIoU {best_iou(found.box, item.boxes):.2f}"
        ax.set_title(title + (" (fallback)" if found.result.fallback else ""), fontsize=8)
        ax.set_axis_off()
    return save(fig, path)

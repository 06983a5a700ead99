"""Occlusion robustness (Naseer et al., "Intriguing Properties of Vision Transformers", NeurIPS 2021)
and an attention-faithfulness test for attention-sink artifacts.

PatchDrop: the image is cut into a grid of cells (by default the model's own patches) and a random
``round(fraction · cells)`` of them (half rounds up) is filled with a constant. Information loss
IL = fraction. The original (``evaluate.py`` of the paper's repository) sets the cells of the
*unnormalised* [0, 1] image to 0 and normalises afterwards, i.e. it paints them **black**; we do the
same by default on already-normalised images: ``fill="black"`` writes ``(0 - mean) / std`` per
channel (ImageNet statistics). ``fill="mean"`` (0 in normalised space, the dataset mean colour) or
any number / per-channel triple in normalised space are the alternatives. Unlike the original,
which drops the same cells for a whole batch, every image gets its own random cells.

- ``feature_correlation``: Pearson correlation between clean and occluded features, after every
  block, of the CLS token, the mean register token (R > 0) and the mean patch token (raw residual
  stream), plus the final-norm CLS. Each correlation is taken per image over the D channels, then
  averaged over images (and repeats). Label-free; IL = 0 gives exactly 1.
- ``attention_faithfulness``: rank patches by the model's own CLS→patch attention (heads averaged,
  patches only, renormalised; CLS and registers are never candidates) and drop the most- vs the
  least-attended ``fraction`` of them (cells aligned to the model's patches); also a random drop of
  the same size. Reports clean-vs-occluded final CLS correlation and cosine. If attention were
  faithful, dropping the most-attended patches would change the CLS most: ``gap`` = correlation
  (least dropped) - correlation (most dropped) is large. Attention sinks on background artifact
  tokens make the "most attended" set uninformative and shrink the gap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vitreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vitreg.eval.progress import track

Fill = str | float | Sequence[float]


@dataclass
class OcclusionSettings:
    """The ``occlusion`` section of conf/analyze.yaml."""

    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # information loss of random PatchDrop
    # patches dropped by the model's own CLS attention, most vs least attended
    faithfulness_fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    repeats: int = 1


# ------------------------------------------------------------------------------------------ PatchDrop


def cells_to_drop(fraction: float, num_cells: int) -> int:
    """``round(fraction · num_cells)`` with halves rounded up (the original floors: 30 % of 196 -> 58, here 59)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction (information loss) must be in [0, 1], got {fraction}")
    return min(num_cells, int(fraction * num_cells + 0.5))


def fill_values(fill: Fill, channels: int = 3) -> Tensor:
    """The per-channel value (normalised space) that dropped cells get."""
    if fill == "black":
        if channels != len(IMAGENET_MEAN):
            raise ValueError(f"fill='black' assumes ImageNet normalisation of 3 channels, got {channels} channels")
        return -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    if fill == "mean":
        return torch.zeros(channels)
    if isinstance(fill, str):
        raise ValueError(f"fill must be 'black', 'mean', a number or {channels} numbers, got {fill!r}")
    values = torch.as_tensor(fill, dtype=torch.float32).flatten()
    if values.numel() == 1:
        return values.expand(channels).clone()
    if values.numel() != channels:
        raise ValueError(f"fill needs 1 or {channels} values, got {values.numel()}")
    return values


def _cell_size(grid: int | Sequence[int], images: Tensor) -> tuple[int, int]:
    ch, cw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    h, w = images.shape[-2:]
    if ch <= 0 or cw <= 0 or h % ch or w % cw:
        raise ValueError(
            f"cell size {ch}x{cw} px must divide the image size {h}x{w}; pick a divisor (e.g. the patch size)"
        )
    return ch, cw


def drop_cells(images: Tensor, cells: Tensor, grid: int | Sequence[int], *, fill: Fill = "black") -> Tensor:
    """A copy of ``images`` (B, C, H, W) with the cells where ``cells`` (B, gh, gw) or (B, gh*gw) is
    True set to ``fill``; cells are ``grid`` px squares (or (h, w) rectangles), row-major."""
    ch, cw = _cell_size(grid, images)
    b, c, h, w = images.shape
    gh, gw = h // ch, w // cw
    cells = torch.as_tensor(cells, dtype=torch.bool, device=images.device)
    if cells.numel() != b * gh * gw or cells.shape[0] != b:
        raise ValueError(
            f"cells must be a bool mask of shape (B, {gh}, {gw}) or (B, {gh * gw}), got {tuple(cells.shape)}"
        )
    pixel_mask = cells.reshape(b, 1, gh, 1, gw, 1).expand(b, 1, gh, ch, gw, cw).reshape(b, 1, h, w)
    value = fill_values(fill, c).to(images.device, images.dtype).view(1, c, 1, 1)
    return torch.where(pixel_mask, value, images)


def random_cells(batch: int, num_cells: int, count: int, generator: torch.Generator | None = None) -> Tensor:
    """(batch, num_cells) bool: ``count`` distinct random cells per row."""
    order = torch.rand(batch, num_cells, generator=generator).argsort(dim=1)
    cells = torch.zeros(batch, num_cells, dtype=torch.bool)
    return cells.scatter_(1, order[:, :count], True)


def patch_drop(
    images: Tensor,
    fraction: float | None,
    grid: int | Sequence[int],
    generator: torch.Generator | None = None,
    *,
    cells: Tensor | None = None,
    fill: Fill = "black",
) -> tuple[Tensor, Tensor]:
    """Random PatchDrop: per image, ``cells_to_drop(fraction, cells)`` random ``grid``-px cells get ``fill``.

    ``cells`` (a (B, gh, gw) bool mask) replaces the random draw (``fraction`` is then unused).
    Returns the occluded copy and the (B, gh, gw) mask of dropped cells.
    """
    ch, cw = _cell_size(grid, images)
    b = images.shape[0]
    gh, gw = images.shape[-2] // ch, images.shape[-1] // cw
    if cells is None:
        if fraction is None:
            raise ValueError("patch_drop needs a fraction (information loss) or an explicit `cells` mask")
        cells = random_cells(b, gh * gw, cells_to_drop(fraction, gh * gw), generator)
    cells = torch.as_tensor(cells, dtype=torch.bool).reshape(b, gh, gw)
    return drop_cells(images, cells.to(images.device), (ch, cw), fill=fill), cells


# ------------------------------------------------------------------------------------------ similarity


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last axis, in float64 (identical rows give exactly 1)."""
    a, b = a.double(), b.double()
    ac, bc = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    num = (ac * bc).sum(-1)
    # sqrt of the product (not the product of sqrts): for a == b it equals num exactly
    den = ((ac * ac).sum(-1) * (bc * bc).sum(-1)).sqrt()
    return torch.where(den > 0, num / den, torch.full_like(num, float("nan"))).clamp(-1.0, 1.0)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last axis, in float64 (identical rows give exactly 1)."""
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = ((a * a).sum(-1) * (b * b).sum(-1)).sqrt()
    return torch.where(den > 0, num / den, torch.full_like(num, float("nan"))).clamp(-1.0, 1.0)


def _key(fraction: float) -> str:
    return f"{fraction:g}"


def _mean(values: list[Tensor]) -> float | None:
    x = torch.cat([v.flatten() for v in values])
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else None


# ------------------------------------------------------------------------------------------ feature correlation


@torch.no_grad()
def layer_features(model: nn.Module, images: Tensor) -> dict[str, Tensor | None]:
    """After every block: CLS (L, B, D), mean register (L, B, D) or None, mean patch (L, B, D);
    plus the final-norm CLS (B, D)."""
    layout = model.layout
    cls, regs, patches = [], [], []
    for layer in model.iter_layers(images):
        if layer.index == 0:
            continue
        tokens = layer.tokens
        cls.append(layout.cls(tokens))
        patches.append(layout.patches(tokens).mean(1))
        if layout.num_registers:
            regs.append(layout.registers(tokens).mean(1))
    return {
        "cls": torch.stack(cls),
        "registers": torch.stack(regs) if regs else None,
        "patches": torch.stack(patches),
        "final_cls": layout.cls(model.norm(tokens)),
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty normalised (N, 3, H, W) tensor, got {got}")


@torch.no_grad()
def feature_correlation(
    model: nn.Module,
    images: Tensor,
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
    *,
    repeats: int = 1,
    seed: int = 0,
    cell_size: int | Sequence[int] | None = None,
    fill: Fill = "black",
    batch_size: int = 32,
) -> dict:
    """Clean-vs-PatchDrop Pearson correlation per layer (see the module docstring).

    ``cell_size`` defaults to the model's patch size (cells aligned to tokens); e.g. 16 px cells on a
    224 image give the paper's 14 x 14 grid. Returns a JSON-ready dict; ``by_fraction[f]["cls"][l]``
    is the correlation after block ``layers[l]`` (1-based).
    """
    _check_images(images)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cell = _cell_size(model.patch_size if cell_size is None else cell_size, images)
    num_cells = (images.shape[-2] // cell[0]) * (images.shape[-1] // cell[1])
    for f in fractions:
        cells_to_drop(f, num_cells)  # validates
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    was_training = model.training
    model.eval()
    kinds = ("cls", "registers", "patches")
    acc: dict[str, dict[str, list[Tensor]]] = {
        _key(f): {k: [] for k in (*kinds, "final_cls", "final_cls_cosine")} for f in fractions
    }
    try:
        for x in track(images.split(batch_size), "occlusion: PatchDrop"):
            x = x.to(device)
            clean = layer_features(model, x)
            for f in fractions:
                for _ in range(repeats):
                    occluded, dropped = patch_drop(x, f, cell, generator, fill=fill)
                    # nothing dropped (IL = 0): the same input, so reuse the clean pass
                    feats = clean if not dropped.any() else layer_features(model, occluded)
                    bucket = acc[_key(f)]
                    for k in kinds:
                        if clean[k] is not None:
                            bucket[k].append(pearson(clean[k], feats[k]).cpu())  # (L, B)
                    bucket["final_cls"].append(pearson(clean["final_cls"], feats["final_cls"]).cpu())
                    bucket["final_cls_cosine"].append(cosine(clean["final_cls"], feats["final_cls"]).cpu())
    finally:
        model.train(was_training)

    def per_layer(parts: list[Tensor]) -> list[float] | None:
        if not parts:
            return None
        x = torch.cat(parts, dim=1)  # (L, images * repeats)
        return [float(v) for v in x.nanmean(dim=1)]

    by_fraction = {}
    for f in fractions:
        bucket = acc[_key(f)]
        by_fraction[_key(f)] = {
            "num_dropped": cells_to_drop(f, num_cells),
            **{k: per_layer(bucket[k]) for k in kinds},
            "final_cls": _mean(bucket["final_cls"]),
            "final_cls_cosine": _mean(bucket["final_cls_cosine"]),
        }
    return {
        "probe": "feature_correlation",
        "fractions": [float(f) for f in fractions],
        "layers": list(range(1, model.n_blocks + 1)),
        "num_images": images.shape[0],
        "repeats": repeats,
        "seed": seed,
        "num_register_tokens": model.num_register_tokens,
        "cell_size": list(cell),
        "num_cells": num_cells,
        "fill": fill if isinstance(fill, str) else fill_values(fill).tolist(),
        "by_fraction": by_fraction,
    }


# ------------------------------------------------------------------------------------------ attention faithfulness


def cls_attention(probs: Tensor, head: str | int = "mean") -> Tensor:
    """CLS row of attention probabilities (B, heads, T, T) -> (B, T), heads averaged or one head."""
    if probs.ndim != 4:
        raise ValueError(f"attention probabilities must be (B, heads, T, T), got shape {tuple(probs.shape)}")
    row = probs[:, :, 0].double()
    if head == "mean":
        return row.mean(1)
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < probs.shape[1]:
        raise ValueError(f"head must be 'mean' or an index in [0, {probs.shape[1]}), got {head!r}")
    return row[:, head]


def patch_attention(probs: Tensor, num_prefix: int, head: str | int = "mean") -> Tensor:
    """CLS→patch attention (B, P) renormalised over patches only: CLS and the ``num_prefix - 1``
    registers are cut out first, so they can never be ranked."""
    row = cls_attention(probs, head)[:, num_prefix:]
    return row / row.sum(-1, keepdim=True).clamp(min=1e-300)


@torch.no_grad()
def attention_scores(model: nn.Module, images: Tensor, *, layer: int = -1, head: str | int = "mean") -> Tensor:
    """The model's own CLS→patch attention at block ``layer`` (B, P), over patches only."""
    maps = model.get_attention_maps(images, blocks=layer)
    (probs,) = maps.values()
    return patch_attention(probs, model.num_prefix_tokens, head)


def attended_cells(scores: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Bool masks (B, P) of the ``cells_to_drop(fraction, P)`` most- and least-attended patches
    (ties broken by patch index, lower first)."""
    b, p = scores.shape
    m = cells_to_drop(fraction, p)
    most = torch.zeros(b, p, dtype=torch.bool, device=scores.device)
    least = torch.zeros_like(most)
    if m:
        most.scatter_(1, scores.argsort(dim=1, descending=True, stable=True)[:, :m], True)
        least.scatter_(1, scores.argsort(dim=1, stable=True)[:, :m], True)
    return most, least


@torch.no_grad()
def attention_faithfulness(
    model: nn.Module,
    images: Tensor,
    fractions: Sequence[float] = (0.1, 0.25, 0.5),
    *,
    layer: int = -1,
    head: str | int = "mean",
    repeats: int = 1,
    seed: int = 0,
    fill: Fill = "black",
    batch_size: int = 32,
) -> dict:
    """Drop the most / least / randomly chosen ``fraction`` of patches by the model's own CLS attention
    at block ``layer``; report clean-vs-occluded final-CLS correlation, cosine and the attention mass
    that was dropped (see the module docstring). The random drop is averaged over ``repeats``."""
    _check_images(images)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    block = model.resolve_block(layer)
    p, layout = model.patch_size, model.layout
    num_patches = (images.shape[-2] // p) * (images.shape[-1] // p)
    for f in fractions:
        cells_to_drop(f, num_patches)  # validates
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    was_training = model.training
    model.eval()
    modes = ("most", "least", "random")
    stats = {_key(f): {m: {"correlation": [], "cosine": [], "attention_mass": []} for m in modes} for f in fractions}
    register_mass, cls_mass = [], []
    try:
        for x in track(images.split(batch_size), "occlusion: attention faithfulness"):
            x = x.to(device)
            (probs,) = model.get_attention_maps(x, blocks=layer).values()
            row = cls_attention(probs, head)
            register_mass.append(layout.registers(row).sum(-1).cpu())
            cls_mass.append(layout.cls(row).cpu())
            scores = patch_attention(probs, layout.num_prefix, head)
            clean = model.forward_features(x)["x_norm_clstoken"]
            for f in fractions:
                most, least = attended_cells(scores, f)
                masks = [("most", most), ("least", least)]
                m = cells_to_drop(f, num_patches)
                masks += [("random", random_cells(len(x), num_patches, m, generator)) for _ in range(repeats)]
                for mode, mask in masks:
                    mask = mask.to(device)
                    occluded = drop_cells(x, mask, p, fill=fill)
                    cls = clean if not mask.any() else model.forward_features(occluded)["x_norm_clstoken"]
                    bucket = stats[_key(f)][mode]
                    bucket["correlation"].append(pearson(clean, cls).cpu())
                    bucket["cosine"].append(cosine(clean, cls).cpu())
                    bucket["attention_mass"].append((scores * mask).sum(-1).cpu())
    finally:
        model.train(was_training)
    by_fraction = {}
    for f in fractions:
        entry = {"num_dropped": cells_to_drop(f, num_patches)}
        for mode in modes:
            entry[mode] = {name: _mean(values) for name, values in stats[_key(f)][mode].items()}
        for name, metric in (("gap", "correlation"), ("gap_cosine", "cosine")):
            least, most = entry["least"][metric], entry["most"][metric]
            entry[name] = None if least is None or most is None else least - most
        by_fraction[_key(f)] = entry
    return {
        "probe": "attention_faithfulness",
        "layer": block,
        "head": head,
        "fractions": [float(f) for f in fractions],
        "num_images": images.shape[0],
        "num_patches": num_patches,
        "repeats": repeats,
        "seed": seed,
        "num_register_tokens": layout.num_registers,
        "fill": fill if isinstance(fill, str) else fill_values(fill).tolist(),
        # where the CLS looks besides patches (raw probabilities, heads as chosen)
        "cls_self_attention": _mean(cls_mass),
        "register_attention": _mean(register_mass) if layout.num_registers else None,
        "by_fraction": by_fraction,
    }


# ------------------------------------------------------------------------------------------ plot


def plot_occlusion(results: dict | Sequence[dict], path: str | os.PathLike) -> Path:
    """PNG at ``path``: correlation vs layer per IL (one panel per token kind) for a
    ``feature_correlation`` result, and grouped most/least/random bars for an
    ``attention_faithfulness`` result. ``results``: one result or a list of them."""
    from matplotlib.ticker import MaxNLocator  # matplotlib is imported only when plotting

    from vitreg.utils import figures

    results = [results] if isinstance(results, dict) else list(results)
    panels = []
    for res in results:
        if res.get("probe") == "feature_correlation":
            first = next(iter(res["by_fraction"].values()))
            panels += [("corr", res, k) for k in ("cls", "registers", "patches") if first[k] is not None]
        elif res.get("probe") == "attention_faithfulness":
            panels.append(("faith", res, None))
        else:
            raise ValueError("plot_occlusion: expected results of feature_correlation or attention_faithfulness")
    fig = figures.new_figure(3.4 * len(panels), 3.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, res, token) in zip(axes, panels, strict=True):
        if kind == "corr":
            for f, entry in res["by_fraction"].items():
                ax.plot(res["layers"], figures.values(entry[token]), marker="o", ms=3, label=f"IL {f}")
            ax.set_xlabel("block")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("Pearson r (clean vs occluded)")
            ax.set_title(f"{token} features", fontsize=9)
        else:
            keys = list(res["by_fraction"])
            width = 0.27
            for i, (mode, colour) in enumerate((("most", "tab:red"), ("least", "tab:blue"), ("random", "tab:gray"))):
                heights = [res["by_fraction"][k][mode]["correlation"] for k in keys]
                ax.bar([j + (i - 1) * width for j in range(len(keys))], heights, width, color=colour, label=mode)
            ax.set_xticks(range(len(keys)), [f"IL {k}" for k in keys], fontsize=8)
            ax.set_ylabel("final CLS Pearson r")
            ax.set_title(f"attention faithfulness (block {res['layer']})", fontsize=9)
        ax.legend(fontsize=7)
    return figures.save(fig, path)

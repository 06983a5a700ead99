"""Fast pictures for live logging: colour-mapped arrays tiled with numpy, no plotting library on the
hot path (a matplotlib figure costs ~0.2-0.5 s to draw, a tile a few milliseconds).

Every function returns a uint8 (H, W, 3) image and a caption that says how to read it (there are
no axes). ``vitreg.telemetry.plots`` draws the labelled versions for reports.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

GAP = 2  # white pixels between tiles


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def colourise(
    values: np.ndarray, vmin: float | None = None, vmax: float | None = None, cmap: str = "inferno"
) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8 through a colour map; NaN is drawn white."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    lo = np.nanmin(x[finite]) if vmin is None and finite.any() else (vmin or 0.0)
    hi = np.nanmax(x[finite]) if vmax is None and finite.any() else (vmax if vmax is not None else 1.0)
    scaled = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)
    index = (np.clip(np.nan_to_num(scaled), 0, 1) * 255).round().astype(np.int64)
    out = _lut(cmap)[index]
    out[~finite] = 255
    return out


def upsample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w, 3) image to ``size`` (H, W): one block per patch."""
    h, w = image.shape[:2]
    rows = np.arange(size[0]) * h // size[0]
    cols = np.arange(size[1]) * w // size[1]
    return image[rows][:, cols]


def _cells(shape: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """Output size for an (rows, cols) grid: whole-pixel cells, about ``width`` x ``height`` or more."""
    rows, cols = shape
    return rows * max(1, -(-height // rows)), cols * max(1, -(-width // cols))


def tile(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Tiles of equal size into one image, ``GAP`` white pixels apart."""
    th, tw = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (th + GAP) - GAP, n_cols * (tw + GAP) - GAP, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            out[i * (th + GAP) : i * (th + GAP) + th, j * (tw + GAP) : j * (tw + GAP) + tw] = t
    return out


def attention_tiles(probe_images: np.ndarray, maps: dict[str, np.ndarray], tile_px: int = 96) -> tuple[np.ndarray, str]:
    """One row per mapped probe image: the image, its last-layer norm map (outlier patches drawn
    white), its CLS attention and each register's attention (last block), each map in its own scale."""
    norm = maps["norm"]
    n = norm.shape[0]
    size = (tile_px, tile_px)
    rows = []
    for i in range(n):
        image = probe_images[i]
        image = image.transpose(1, 2, 0) if image.shape[0] == 3 else image
        row = [upsample(np.ascontiguousarray(image), size)]
        heat = colourise(np.log(np.maximum(norm[i], 1e-12)))
        if "outliers" in maps:
            heat[maps["outliers"][i].astype(bool)] = 255
        row.append(upsample(heat, size))
        if "cls_attention" in maps:
            row.append(upsample(colourise(maps["cls_attention"][i], cmap="viridis"), size))
        for reg in maps.get("register_attention", np.zeros((n, 0)))[i]:
            row.append(upsample(colourise(reg, cmap="viridis"), size))
        rows.append(row)
    registers = maps["register_attention"].shape[1] if "register_attention" in maps else 0
    caption = (
        "rows: probe images; columns: image | log patch norm, last layer (white = outlier) | CLS attention"
        + (f" | attention of registers 0..{registers - 1}" if registers else "")
        + " (last block; each map in its own colour scale)"
    )
    return tile(rows), caption


def emergence_image(history: list[dict], width: int = 360, height: int = 240) -> tuple[np.ndarray, str]:
    """Layer x step heat map of the headline detector's patch outlier fraction (rows: layer 0 at the
    top to the last layer; columns: the measurements in step order); colour 0 .. max over the map."""
    history = sorted(history, key=lambda r: r["step"])
    detector = history[-1]["detector"]
    grid = np.array(
        [[np.nan if f is None else f for f in r["outliers"][detector]["patch_fraction"]] for r in history],
        dtype=np.float64,
    ).T  # (layers, steps)
    vmax = float(np.nanmax(grid)) if np.isfinite(grid).any() else 0.0
    image = colourise(grid, 0.0, max(vmax, 1e-9), cmap="magma")
    image = upsample(image, _cells(grid.shape, width, height))
    steps = [r["step"] for r in history]
    caption = (
        f"{detector} outlier fraction of patches; rows: layer 0 (top) .. {grid.shape[0] - 1}; "
        f"columns: steps {steps[0]} .. {steps[-1]} ({len(steps)} measurements); colour 0 .. {vmax:.3g}"
    )
    return image, caption


def position_image(record: dict, px: int = 160) -> tuple[np.ndarray, str]:
    freq = np.asarray(record["position_frequency"], dtype=np.float64)
    image = upsample(colourise(freq, 0.0, max(float(freq.max()), 1e-9)), (px, px * freq.shape[1] // freq.shape[0]))
    return (
        image,
        f"how often each patch position is a last-layer outlier ({record['detector']}); colour 0 .. {freq.max():.3g}",
    )


def histogram_image(record: dict, stream: str, width: int = 400, height: int = 240) -> tuple[np.ndarray, str]:
    """Layer x log-norm bin heat map of the patch-norm histograms (log counts)."""
    counts = np.asarray(record["norms"][stream]["histogram"], dtype=np.float64)  # (layers, bins)
    used = np.nonzero(counts.sum(0))[0]
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, counts.shape[1])
    grid = np.log1p(counts[:, lo:hi])
    image = upsample(colourise(grid, cmap="viridis"), _cells(grid.shape, width, height))
    edges = record["histogram_edges"]
    caption = (
        f"{stream} patch-norm histograms; rows: layer 0 (top) .. {counts.shape[0] - 1}; "
        f"columns: log-spaced norm bins {edges[lo]:.3g} .. {edges[hi]:.3g}; colour: log(1 + count)"
    )
    return image, caption

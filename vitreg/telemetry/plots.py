"""Pictures of telemetry records and maps (see ``stats.compute_statistics`` for the record layout).

Every function builds a small ``matplotlib.figure.Figure`` on an Agg canvas without touching pyplot,
so nothing is registered in pyplot's global figure list and the process-wide backend is never
switched (importing this module in a notebook leaves its inline backend alone). ``save`` and
``figure_to_array`` render a figure and close it; a figure that is dropped without either is freed
by the garbage collector like any other object.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vitreg.utils.figures import new_figure, values

QUANTILE_KEYS = ("p50", "p90", "p99", "max")
DETECTOR_COLOURS = {"fixed": "tab:gray", "robust_z": "tab:orange", "valley": "tab:blue"}


# --------------------------------------------------------------------------------------------- helpers


def record_title(record: dict, name: str | None = None) -> str:
    parts = [name] if name else []
    if record.get("step") is not None:
        parts.append(f"step {record['step']}")
    if record.get("model"):
        parts.append(str(record["model"]))
    if record.get("resolution"):
        parts.append(f"{record['resolution']}px")
    parts.append(f"R={record.get('num_registers', 0)}")
    return ", ".join(parts)


def detector_colour(detector: str) -> str:
    return DETECTOR_COLOURS.get(detector, "tab:green")


def images_hwc(probe_images, count: int | None = None) -> np.ndarray | None:
    """Probe images (B, 3, S, S) or (B, S, S, 3), torch or numpy, as a uint8 (B, S, S, 3) array."""
    if probe_images is None:
        return None
    if hasattr(probe_images, "detach"):
        probe_images = probe_images.detach().cpu().numpy()
    images = np.asarray(probe_images)
    if images.ndim != 4:
        raise ValueError(f"probe images must be (B, 3, S, S) or (B, S, S, 3), got shape {images.shape}")
    if images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8:
        scale = 255.0 if images.max(initial=0) <= 1.0 else 1.0
        images = np.clip(images * scale, 0, 255).astype(np.uint8)
    return images if count is None else images[:count]


def show_map(
    ax: Axes, heat: np.ndarray, title: str | None = None, cmap: str = "inferno", colorbar: bool = False, **kwargs
) -> None:
    """A heat map in its own colour scale, without ticks; ``colorbar`` adds a thin bar with its range,
    since maps drawn side by side in their own scales cannot be compared by colour alone."""
    heat = np.asarray(heat, dtype=float)
    finite = heat[np.isfinite(heat)]
    vmin = kwargs.pop("vmin", float(finite.min()) if finite.size else 0.0)
    vmax = max(kwargs.pop("vmax", float(finite.max()) if finite.size else 1.0), vmin + 1e-12)
    image = ax.imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", **kwargs)
    _no_ticks(ax, title)
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, fraction=0.08, pad=0.02, ticks=[vmin, vmax], format="%.2g")
        bar.ax.tick_params(labelsize=5, length=1.5, pad=1)


def show_image(ax: Axes, image: np.ndarray, title: str | None = None) -> None:
    ax.imshow(image, interpolation="antialiased")
    _no_ticks(ax, title)


def _no_ticks(ax: Axes, title: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


# ------------------------------------------------------------------------------------ one record


def norm_histograms(record: dict, stream: str = "prenorm") -> Figure:
    """Layer x log-norm heat map of the patch-norm histograms (log colour scale).

    Bimodality shows as a second bright band at high norms in the late layers. The headline
    detector's threshold of each layer is drawn as red ticks when ``stream`` is the stream the
    thresholds were fitted on; registers' median norms are drawn as cyan crosses."""
    norms = record["norms"][stream]
    hist = np.asarray(norms["histogram"], dtype=float)  # (L+1, bins)
    edges = np.asarray(record["histogram_edges"], dtype=float)
    depth = hist.shape[0] - 1
    fig = new_figure(6.0, 1.6 + 0.22 * (depth + 1))
    ax = fig.add_subplot()
    vmax = max(float(hist.max(initial=0)), 1.0)
    mesh = ax.pcolormesh(
        edges,
        np.arange(depth + 2) - 0.5,
        np.ma.masked_less_equal(hist, 0),
        norm=LogNorm(vmin=1.0, vmax=max(vmax, 1.0 + 1e-6)),
        cmap="viridis",
        shading="flat",
    )
    ax.set_facecolor("black")
    ax.set_xscale("log")
    layers = np.arange(depth + 1)
    detector = record.get("detector")
    if stream == record.get("stream") and detector in record.get("outliers", {}):
        thr = values(record["outliers"][detector]["threshold"])
        shown = np.isfinite(thr) & (thr >= edges[0]) & (thr <= edges[-1])
        if shown.any():
            ax.scatter(thr[shown], layers[shown], marker="|", s=120, c="red", label=f"{detector} threshold")
    elif detector:
        ax.text(
            0.99,
            0.01,
            f"thresholds are fitted on {record.get('stream')}",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="white",
        )
    if "register" in norms:
        reg = values(norms["register"]["p50"])
        ok = np.isfinite(reg) & (reg >= edges[0]) & (reg <= edges[-1])
        if ok.any():
            ax.scatter(reg[ok], layers[ok], marker="x", s=18, c="cyan", label="register median")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(-0.5, depth + 0.5)
    ax.set_yticks(layers if depth <= 24 else layers[:: max(1, depth // 12)])
    ax.set_xlabel(f"patch token norm ({stream})")
    ax.set_ylabel("layer (blocks applied)")
    ax.set_title(f"patch-norm histograms per layer — {record_title(record)}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    fig.colorbar(mesh, ax=ax, label="patch tokens", pad=0.01)
    return fig


def layer_quantiles(record: dict) -> Figure:
    """p50/p90/p99/max patch norms per layer for both streams, with CLS and register medians; log y."""
    fig = new_figure(9.0, 3.4)
    axes = fig.subplots(1, 2)
    shades = {"p50": 0.35, "p90": 0.55, "p99": 0.75, "max": 0.95}
    for ax, stream in zip(axes, ("prenorm", "postnorm"), strict=True):
        norms = record["norms"][stream]
        for key in QUANTILE_KEYS:
            y = values(norms["patch"][key])
            ax.plot(
                np.arange(len(y)), y, "-o", ms=2.5, color=(shades[key] * 0.2, 0.3, shades[key]), label=f"patch {key}"
            )
        cls = values(norms["cls"]["p50"])
        ax.plot(np.arange(len(cls)), cls, "--", color="black", label="CLS p50")
        if "register" in norms:
            reg = values(norms["register"]["p50"])
            ax.plot(np.arange(len(reg)), reg, ":", lw=2, color="tab:purple", label="register p50")
        ax.set_yscale("log")
        ax.set_xlabel("layer (blocks applied)")
        ax.set_title(f"{stream} token norms", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("L2 norm")
    axes[0].legend(fontsize=7)
    fig.suptitle(record_title(record), fontsize=9)
    return fig


def outlier_fractions(record: dict) -> Figure:
    """Patch (solid) and register (dashed) outlier fraction per layer for each detector, with the
    emergence layers as vertical lines (the headline detector's is thick). Symlog y: fractions of a
    few percent stay visible next to 100 %."""
    fig = new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    headline = record.get("detector")
    depth = record.get("depth")
    for detector, result in record["outliers"].items():
        colour = detector_colour(detector)
        patch = values(result["patch_fraction"])
        layers = np.arange(len(patch))
        depth = len(patch) - 1 if depth is None else depth
        ax.plot(
            layers,
            patch,
            "-o",
            ms=3,
            color=colour,
            lw=2.0 if detector == headline else 1.0,
            label=f"{detector}: patches",
        )
        reg = values(result.get("register_fraction"))
        if reg.size and np.isfinite(reg).any():
            ax.plot(layers, reg, "--s", ms=3, color=colour, label=f"{detector}: registers")
        layer = record.get("emergence_layer", {}).get(detector)
        if layer is not None:
            ax.axvline(
                layer,
                color=colour,
                ls=":",
                lw=2.5 if detector == headline else 1.0,
                label=f"{detector}: emerges at layer {layer}",
            )
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.05)
    if depth is not None:
        ax.set_xlim(-0.3, depth + 0.3)
    ax.set_xlabel("layer (blocks applied)")
    ax.set_ylabel("outlier fraction")
    ax.set_title(f"outliers per layer (headline: {headline}) — {record_title(record)}", fontsize=9)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=6.5, ncol=2)
    return fig


def position_map(record: dict) -> Figure:
    """How often each patch position is a last-layer outlier of the headline detector."""
    freq = np.asarray(values_2d(record["position_frequency"]), dtype=float)
    fig = new_figure(4.2, 3.6)
    ax = fig.add_subplot()
    vmax = max(float(np.nanmax(freq, initial=0.0)), 1e-6)
    image = ax.imshow(freq, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    if not np.nanmax(freq, initial=0.0) > 0:
        ax.text(0.5, 0.5, "no outliers", transform=ax.transAxes, ha="center", va="center", color="white")
    ax.set_title(f"last-layer {record.get('detector')} outliers by position\n{record_title(record)}", fontsize=8)
    fig.colorbar(image, ax=ax, label="fraction of probe images")
    return fig


def values_2d(rows: Sequence[Sequence]) -> np.ndarray:
    return np.array([values(row) for row in rows], dtype=float)


def attention_maps(
    probe_images,
    maps: dict[str, np.ndarray],
    resolution: int | None = None,
    max_registers: int = 8,
    colorbars: bool = True,
) -> Figure:
    """One row per mapped probe image: the image, its last-layer patch-norm map (headline outliers
    dotted), the last block's CLS attention over patches and each register's attention (at most
    ``max_registers``).

    ``colorbars``: each column shares one colour scale, shown by a bar under it, so images compare
    by colour (one bar per column: a bar per map would cost a second more to lay out). Without
    them every map is drawn in its own scale."""
    norm = np.asarray(maps["norm"], dtype=float)
    n = norm.shape[0]
    images = images_hwc(probe_images, n)
    outliers = maps.get("outliers")
    registers = maps.get("register_attention")
    num_registers = 0 if registers is None else min(registers.shape[1], max_registers)
    heat_columns: list[tuple[str, np.ndarray, str, str]] = [("patch norm", norm, "inferno", "L2 norm")]
    if maps.get("cls_attention") is not None:
        heat_columns.append(("CLS attention", np.asarray(maps["cls_attention"], dtype=float), "viridis", "attention"))
    for r in range(num_registers):
        heat_columns.append((f"register {r}", np.asarray(registers[:, r], dtype=float), "viridis", "attention"))
    columns = (images is not None) + len(heat_columns)
    # A fixed grid (the colour bars in an extra row) instead of constrained layout, which takes
    # about a second to place this many axes on a CPU core.
    width, height = 1.35 * columns + 0.2, 1.35 * n + 0.45 + (0.4 if colorbars else 0.0)
    fig = new_figure(width, height, layout=None)
    ratios = [1.0] * n + ([0.07] if colorbars else [])
    grid = fig.subplots(
        len(ratios),
        columns,
        squeeze=False,
        gridspec_kw={
            "height_ratios": ratios,
            "left": 0.1 / width,
            "right": 1 - 0.1 / width,
            "top": 1 - 0.45 / height,
            "bottom": (0.3 if colorbars else 0.05) / height,
            "wspace": 0.08,
            "hspace": 0.12,
        },
    )
    axes = grid[:n]
    offset = int(images is not None)
    if images is not None:
        for i in range(n):
            title = (f"image ({resolution}px)" if resolution else "image") if i == 0 else None
            show_image(axes[i, 0], images[i], title)
        if colorbars:
            grid[n, 0].set_axis_off()
    for j, (title, heat, cmap, label) in enumerate(heat_columns):
        finite = heat[np.isfinite(heat)]
        scale = {"vmin": float(finite.min()), "vmax": float(finite.max())} if colorbars and finite.size else {}
        for i in range(n):
            show_map(axes[i, offset + j], heat[i], title if i == 0 else None, cmap=cmap, **scale)
        if colorbars:
            bar = fig.colorbar(axes[-1, offset + j].images[0], cax=grid[n, offset + j], orientation="horizontal")
            bar.ax.tick_params(labelsize=5, length=1.5, pad=1)
            bar.set_label(label, fontsize=6, labelpad=1)
            bar.ax.xaxis.set_major_locator(MaxNLocator(3))
    if outliers is not None:
        for i in range(n):
            if np.asarray(outliers[i]).any():
                ys, xs = np.nonzero(np.asarray(outliers[i]))
                axes[i, offset].scatter(xs, ys, s=6, c="cyan", marker="o", linewidths=0)
    more = (
        ""
        if registers is None or registers.shape[1] <= max_registers
        else f" (first {max_registers} of {registers.shape[1]} registers)"
    )
    fig.suptitle(f"last layer: norms and attention{more}", fontsize=8)
    return fig


# ----------------------------------------------------------------------------------- over training


def pick_resolution(records: Sequence[dict], model: str | None = None) -> int | None:
    """The resolution with most records of ``model`` (ties: the largest)."""
    counts = Counter(r.get("resolution") for r in records if model is None or r.get("model") == model)
    if not counts:
        return None
    return max(counts, key=lambda res: (counts[res], res if res is not None else -1))


def select(records: Sequence[dict], model: str | None = None, resolution: int | None = None) -> list[dict]:
    """Records of ``model`` at ``resolution`` (the most measured one when None), sorted by step."""
    if resolution is None:
        resolution = pick_resolution(records, model)
    chosen = [r for r in records if (model is None or r.get("model") == model) and r.get("resolution") == resolution]
    return sorted(chosen, key=lambda r: r.get("step", 0))


def emergence_heatmap(
    records: Sequence[dict], model: str = "teacher", resolution: int | None = None, detector: str | None = None
) -> Figure:
    """Layer x step heat map of the patch outlier fraction of ``detector`` (default: the records'
    headline detector) over training, with each step's emergence layer as white dots."""
    chosen = select(records, model, resolution)
    if not chosen:
        available = sorted({(r.get("model"), r.get("resolution")) for r in records}, key=str)
        raise ValueError(f"no telemetry records for model={model!r}, resolution={resolution}; have {available}")
    detector = detector or chosen[-1]["detector"]
    steps = [r["step"] for r in chosen]
    depth = max(len(r["outliers"][detector]["patch_fraction"]) for r in chosen) - 1
    grid = np.full((depth + 1, len(chosen)), np.nan)
    for j, r in enumerate(chosen):
        fractions = values(r["outliers"][detector]["patch_fraction"])
        grid[: len(fractions), j] = fractions
    fig = new_figure(min(5.0 + 0.1 * len(chosen), 12.0), 1.6 + 0.2 * (depth + 1))
    ax = fig.add_subplot()
    vmax = max(float(np.nanmax(grid, initial=0.0)), 1e-3)
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    emerged = [(j, r["emergence_layer"].get(detector)) for j, r in enumerate(chosen)]
    emerged = [(j, layer) for j, layer in emerged if layer is not None]
    if emerged:
        ax.scatter(
            *zip(*emerged, strict=True), s=16, c="cyan", edgecolors="black", linewidths=0.5, label="emergence layer"
        )
        ax.legend(fontsize=7, loc="upper left", framealpha=0.5)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (blocks applied)")
    res = chosen[0].get("resolution")
    ax.set_title(
        f"{detector} patch outlier fraction — {model}, {res}px, R={chosen[0].get('num_registers', 0)}", fontsize=9
    )
    fig.colorbar(image, ax=ax, label="outlier fraction", pad=0.01)
    return fig

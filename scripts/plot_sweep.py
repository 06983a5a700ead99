"""Compare the artifact telemetry of several runs (e.g. a sweep over the number of registers).

    python scripts/plot_sweep.py outputs/demo/registers=0 outputs/demo/registers=4 --out outputs/sweep_plots
    python scripts/plot_sweep.py runs/* --model student --resolution 448

Reads each run's local telemetry (RUN_DIR/telemetry/, no W&B needed) and writes into --out:
outlier_fraction_vs_step.png, emergence_layer_vs_step.png, layer_quantiles_last_step.png,
register_neurons_vs_step.png (the best register neuron's ratio and the top-k overlap per step),
locality_channels_vs_step.png (last-layer CLS-patch cosine and channel-outlier count per step),
attention_maps.png (the same probe images across runs, last measured step of each) and
sweep_summary.json. Runs are labelled by their register count (plus the directory when two runs
share one). Exit code 1, with a message naming the directory, when a run has no telemetry.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
from matplotlib.ticker import MaxNLocator

from vitreg.telemetry import plots
from vitreg.telemetry.store import PROBE_IMAGES, read_maps, read_records, telemetry_dir
from vitreg.utils import figures
from vitreg.utils.io import atomic_write_bytes, json_ready


class SweepError(Exception):
    pass


def load_run(run_dir: Path, model: str) -> list[dict]:
    try:
        records = read_records(run_dir)
    except FileNotFoundError as e:
        raise SweepError(f"{run_dir}: no telemetry ({e})") from e
    if not records:
        raise SweepError(f"{run_dir}: the telemetry file has no readable record")
    if not any(r.get("model") == model for r in records):
        have = sorted({str(r.get("model")) for r in records})
        raise SweepError(f"{run_dir}: no {model} telemetry (have: {', '.join(have)}); pick one with --model")
    return records


def common_resolution(runs: list[list[dict]], model: str, dirs: list[Path]) -> int:
    """The resolution every run measured, the most measured one first, ties to the largest."""
    per_run = [{r.get("resolution") for r in records if r.get("model") == model} for records in runs]
    shared = set.intersection(*per_run)
    if not shared:
        listing = "; ".join(f"{d}: {sorted(res, key=str)}" for d, res in zip(dirs, per_run, strict=True))
        raise SweepError(f"the runs share no measured resolution ({listing}); pick one with --resolution")
    counts = Counter(r.get("resolution") for records in runs for r in records if r.get("model") == model)
    return max(shared, key=lambda res: (counts[res], res))


def run_labels(dirs: list[Path], registers: list[int]) -> list[str]:
    labels = [f"R={r}" for r in registers]
    counts = Counter(labels)
    names = [d.name or str(d) for d in dirs]
    name_counts = Counter(names)
    return [
        label if counts[label] == 1 else f"{label} ({name if name_counts[name] == 1 else d})"
        for label, name, d in zip(labels, names, dirs, strict=True)
    ]


def plot_outlier_fraction(runs: list[dict], model: str, resolution: int):
    fig = figures.new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        colour = f"C{i}"
        steps = [r["step"] for r in run["records"]]
        head = [r["outliers"][run["detector"]] for r in run["records"]]
        ax.plot(
            steps,
            [figures.values(h["patch_fraction"])[-1] for h in head],
            "-o",
            ms=3,
            color=colour,
            label=f"{run['label']} patches",
        )
        if run["registers"]:
            reg = [figures.values(h["register_fraction"])[-1] for h in head]
            ax.plot(steps, reg, "--s", ms=3, color=colour, label=f"{run['label']} registers")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("last-layer outlier fraction")
    ax.set_title(f"high-norm tokens at the output ({_detectors(runs)}; {model}, {resolution}px)", fontsize=9)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_emergence(runs: list[dict], model: str, resolution: int):
    fig = figures.new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    depth = max(run["records"][-1].get("depth", 0) or 0 for run in runs)
    none_level = depth + 1
    for i, run in enumerate(runs):
        steps = np.array([r["step"] for r in run["records"]])
        layers = figures.values([r["emergence_layer"].get(run["detector"]) for r in run["records"]])
        ax.plot(steps, layers, "-o", ms=3, color=f"C{i}", label=run["label"])
        missing = ~np.isfinite(layers)
        if missing.any():
            ax.plot(steps[missing], np.full(missing.sum(), none_level), "x", color=f"C{i}")
    ax.axhline(none_level - 0.5, color="black", lw=0.5)
    ticks = list(range(0, depth + 1, max(1, (depth + 1) // 8)))
    ax.set_yticks([*ticks, none_level], [*map(str, ticks), "none"])
    ax.set_ylim(-0.5, none_level + 0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("emergence layer")
    ax.set_title(f"first layer with high-norm patches ({_detectors(runs)}; {model}, {resolution}px)", fontsize=9)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=7)
    return fig


def plot_last_quantiles(runs: list[dict], model: str, resolution: int):
    fig = figures.new_figure(9.0, 3.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key in zip(axes, ("p99", "max"), strict=True):
        for i, run in enumerate(runs):
            last = run["records"][-1]
            y = figures.values(last["norms"][last["stream"]]["patch"][key])
            ax.plot(np.arange(len(y)), y, "-o", ms=2.5, color=f"C{i}", label=f"{run['label']} (step {last['step']})")
        ax.set_yscale("log")
        ax.set_xlabel("layer (blocks applied)")
        ax.set_title(f"patch norm {key}", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel(f"L2 norm ({runs[0]['records'][-1]['stream']})")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"last measured step per run — {model}, {resolution}px", fontsize=9)
    return fig


def neuron_series(records: list[dict]) -> dict[str, np.ndarray]:
    """Per measured step: the register neurons' best ratio, its block and the top-k overlap (NaN: none;
    records from before the statistic existed are left out)."""
    with_neurons = [r for r in records if r.get("register_neurons") is not None]
    best = [(r["register_neurons"]["neurons"] or [None])[0] for r in with_neurons]
    return {
        "steps": np.array([r["step"] for r in with_neurons]),
        "top_ratio": figures.values([b["ratio"] if b else None for b in best]),
        "top_layer": figures.values([b["layer"] if b else None for b in best]),
        "overlap": figures.values([r["register_neurons"]["overlap"] for r in with_neurons]),
    }


def plot_register_neurons(runs: list[dict], model: str, resolution: int):
    """Left: the best register neuron's ratio (mean |act| at outliers / elsewhere), labelled with its block;
    right: the overlap of the top-k set with the previous measurement. None when no run has the statistic."""
    series = [neuron_series(run["records"]) for run in runs]
    if not any(s["steps"].size for s in series):
        return None
    fig = figures.new_figure(10.0, 3.6)
    ratio_ax, overlap_ax = fig.subplots(1, 2)
    for i, (run, s) in enumerate(zip(runs, series, strict=True)):
        if not s["steps"].size:
            continue
        ratio_ax.plot(s["steps"], s["top_ratio"], "-o", ms=3, color=f"C{i}", label=run["label"])
        last = np.flatnonzero(np.isfinite(s["top_layer"]))
        if last.size:  # the block of the last measured best neuron
            j = last[-1]
            ratio_ax.annotate(
                f"block {int(s['top_layer'][j])}", (s["steps"][j], s["top_ratio"][j]), fontsize=6, color=f"C{i}"
            )
        overlap_ax.plot(s["steps"], s["overlap"], "-o", ms=3, color=f"C{i}", label=run["label"])
    ratio_ax.set_yscale("log")
    ratio_ax.set_ylabel("best ratio (|act| at outliers / elsewhere)")
    ratio_ax.set_title("top register neuron (gaps: no outliers)", fontsize=9)
    overlap_ax.set_ylim(-0.05, 1.05)
    overlap_ax.set_ylabel("top-k overlap with previous measurement")
    overlap_ax.set_title("stability of the top-k neurons", fontsize=9)
    for ax in (ratio_ax, overlap_ax):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.25)
    ratio_ax.legend(fontsize=7)
    fig.suptitle(f"register neurons over training — {model}, {resolution}px", fontsize=9)
    return fig


def plot_locality_channels(runs: list[dict], model: str, resolution: int):
    """The last layer's CLS-patch cosine (locality drift) and channel-outlier count over steps."""
    fig = figures.new_figure(10.0, 3.6)
    cosine_ax, channel_ax = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        steps = [r["step"] for r in run["records"]]
        cosine = figures.values([(r.get("cls_patch_cosine") or [None])[-1] for r in run["records"]])
        channels = figures.values(
            [((r.get("channel_outliers") or {}).get("count") or [None])[-1] for r in run["records"]]
        )
        cosine_ax.plot(steps, cosine, "-o", ms=3, color=f"C{i}", label=run["label"])
        channel_ax.plot(steps, channels, "-o", ms=3, color=f"C{i}", label=run["label"])
    cosine_ax.set_ylabel("mean cosine(CLS, patch), last layer")
    cosine_ax.set_title("locality drift: CLS and patches alike", fontsize=9)
    channel_ax.set_ylabel("channels with mean |x| > ratio x median")
    channel_ax.set_title("channel outliers, last layer", fontsize=9)
    channel_ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count of channels
    for ax in (cosine_ax, channel_ax):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.25)
    cosine_ax.legend(fontsize=7)
    fig.suptitle(f"last-layer locality and channel outliers — {model}, {resolution}px", fontsize=9)
    return fig


def plot_attention(runs: list[dict], num_images: int, max_registers: int, model: str, resolution: int):
    """Rows: the first probe images; columns: the image, each run's CLS attention, then each register
    run's register attention maps (at most ``max_registers`` per run), all at each run's last step."""
    with_maps = [run for run in runs if run["maps"] is not None and "cls_attention" in run["maps"]]
    if not with_maps:
        return None
    n = min([num_images] + [run["maps"]["cls_attention"].shape[0] for run in with_maps])
    images = next((run["probe"] for run in with_maps if run["probe"] is not None), None)
    if images is not None:
        n = min(n, len(images))
    columns: list[tuple[str, np.ndarray]] = []
    for run in with_maps:
        columns.append((f"{run['label']}\nCLS", run["maps"]["cls_attention"]))
    for run in with_maps:
        registers = run["maps"].get("register_attention")
        if registers is not None:
            for r in range(min(registers.shape[1], max_registers)):
                columns.append((f"{run['label']}\nregister {r}", registers[:, r]))
    total = len(columns) + (images is not None)
    fig = figures.new_figure(1.75 * total + 0.2, 1.35 * n + 0.6)
    axes = fig.subplots(n, total, squeeze=False)
    for i in range(n):
        row = list(axes[i])
        if images is not None:
            plots.show_image(row.pop(0), images[i], "image" if i == 0 else None)
        for (title, heat), ax in zip(columns, row, strict=True):
            plots.show_map(ax, heat[i], title if i == 0 else None, cmap="viridis", colorbar=True)
    fig.suptitle(f"last-block attention over patches — {model}, {resolution}px", fontsize=8)
    return fig


def _detectors(runs: list[dict]) -> str:
    return "/".join(sorted({run["detector"] for run in runs}))


def load_probe_images(run_dir: Path, count: int) -> np.ndarray | None:
    path = telemetry_dir(run_dir) / PROBE_IMAGES
    if not path.exists():
        return None
    with np.load(path) as data:
        return data["images"][:count]  # (B, S, S, 3) uint8


def run_summary(run: dict) -> dict:
    last = run["records"][-1]
    outliers = last["outliers"]
    return {
        "dir": str(run["dir"]),
        "label": run["label"],
        "registers": run["registers"],
        "detector": run["detector"],
        "steps": [r["step"] for r in run["records"]],
        "last_step": last["step"],
        "last_patch_outlier_fraction": outliers[run["detector"]]["patch_fraction"][-1],
        "last_register_outlier_fraction": outliers[run["detector"]]["register_fraction"][-1]
        if run["registers"]
        else None,
        "last_outlier_fractions": {
            d: {"patch": v["patch_fraction"][-1], "register": v["register_fraction"][-1] if run["registers"] else None}
            for d, v in outliers.items()
        },
        "emergence_layer": last["emergence_layer"].get(run["detector"]),
        "emergence_layers": last["emergence_layer"],
        "emergence_layer_by_step": {str(r["step"]): r["emergence_layer"].get(run["detector"]) for r in run["records"]},
        "register_health": last.get("registers"),
        "register_neurons_by_step": {
            str(r["step"]): {
                "top": (r["register_neurons"]["neurons"] or [None])[0],
                "overlap": r["register_neurons"]["overlap"],
            }
            for r in run["records"]
            if r.get("register_neurons") is not None
        },
        "cls_patch_cosine_by_step": {str(r["step"]): r["cls_patch_cosine"][-1] for r in run["records"]},
        "channel_outliers_by_step": {str(r["step"]): r["channel_outliers"]["count"][-1] for r in run["records"]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (each with a telemetry/ folder)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/sweep_plots"),
        help="where the plots go (default: outputs/sweep_plots/)",
    )
    parser.add_argument("--model", default="teacher", help="teacher or student (default: teacher)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="probe resolution (default: the most measured one all runs share)"
    )
    parser.add_argument("--detector", default=None, help="outlier detector (default: each run's headline detector)")
    parser.add_argument("--images", type=int, default=3, help="probe images in attention_maps.png (default: 3)")
    parser.add_argument("--max-registers", type=int, default=4, help="register maps per run in attention_maps.png")
    args = parser.parse_args(argv)

    try:
        dirs = list(args.run_dirs)
        for d in dirs:
            if not d.is_dir():
                raise SweepError(f"{d}: not a directory")
        loaded = [load_run(d, args.model) for d in dirs]
        resolution = args.resolution if args.resolution is not None else common_resolution(loaded, args.model, dirs)
        runs = []
        for d, records in zip(dirs, loaded, strict=True):
            chosen = plots.select(records, args.model, resolution)
            if not chosen:
                have = sorted({r.get("resolution") for r in records if r.get("model") == args.model}, key=str)
                raise SweepError(f"{d}: no {args.model} telemetry at {resolution}px (have: {have})")
            detector = args.detector or chosen[-1]["detector"]
            if detector not in chosen[-1]["outliers"]:
                raise SweepError(f"{d}: unknown detector {detector!r} (have: {sorted(chosen[-1]['outliers'])})")
            runs.append(
                {
                    "dir": d,
                    "records": chosen,
                    "registers": int(chosen[-1].get("num_registers") or 0),
                    "detector": detector,
                }
            )
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    for run, label in zip(runs, run_labels(dirs, [run["registers"] for run in runs]), strict=True):
        run["label"] = label
        last = run["records"][-1]
        try:
            run["maps"] = read_maps(run["dir"], last["step"], args.model, resolution)
        except (OSError, KeyError, ValueError) as e:
            print(
                f"warning: {run['dir']}: no maps for step {last['step']} ({e}); left out of attention_maps.png",
                file=sys.stderr,
            )
            run["maps"] = None
        run["probe"] = load_probe_images(run["dir"], args.images)
    probes = [run["probe"] for run in runs if run["probe"] is not None]
    if any(p.shape != probes[0].shape or not np.array_equal(p, probes[0]) for p in probes[1:]):
        print(
            "warning: the runs' probe images differ; attention_maps.png shows the first run's images", file=sys.stderr
        )

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = [
        figures.save(plot_outlier_fraction(runs, args.model, resolution), out / "outlier_fraction_vs_step.png"),
        figures.save(plot_emergence(runs, args.model, resolution), out / "emergence_layer_vs_step.png"),
        figures.save(plot_last_quantiles(runs, args.model, resolution), out / "layer_quantiles_last_step.png"),
        figures.save(plot_locality_channels(runs, args.model, resolution), out / "locality_channels_vs_step.png"),
    ]
    neurons = plot_register_neurons(runs, args.model, resolution)
    if neurons is None:
        print(
            "warning: no run has register-neuron telemetry; register_neurons_vs_step.png not written", file=sys.stderr
        )
    else:
        written.append(figures.save(neurons, out / "register_neurons_vs_step.png"))
    attention = plot_attention(runs, max(1, args.images), args.max_registers, args.model, resolution)
    if attention is None:
        print("warning: no run has attention maps; attention_maps.png not written", file=sys.stderr)
    else:
        written.append(figures.save(attention, out / "attention_maps.png"))
    summary = {"model": args.model, "resolution": resolution, "runs": [run_summary(run) for run in runs]}
    text = json.dumps(json_ready(summary), allow_nan=False, indent=1)
    written.append(atomic_write_bytes(out / "sweep_summary.json", text.encode("utf-8")))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

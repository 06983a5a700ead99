"""One-screen console summaries of the evaluation results (the JSON files hold everything); each task's
entry in ``vitreg.eval.tasks.EVALUATIONS`` names its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def knn_lines(r: dict) -> list[str]:
    lines = [f"{r['num_train']} bank / {r['num_val']} query images, {r['num_classes']} classes"]
    for key, value in r.items():
        if key.startswith("k="):
            lines.append(f"{key:>6}: top-1 {_pct(value['top1'])}  top-5 {_pct(value.get('top5'))}")
    lines.append(f"best: k={r['best']['k']} top-1 {_pct(r['best']['top1'])}")
    return lines


def linear_lines(r: dict) -> list[str]:
    b = r["best"]
    return [
        f"{r['mode']} features, {r['num_train']} train / {r['num_val']} val images, {len(r['classifiers'])} classifiers",
        f"best: top-1 {_pct(b['top1'])} ({b['name']}: last {b['n_blocks']} block(s), avgpool {b['avgpool']})",
    ]


def lost_lines(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        f"CorLoc {_pct(r['corloc'])} on {r['num_images']} images "
        f"(layer {s['layer']}, {s['kind']}, normalize {s['normalize']}, bias {s['gram_bias']}; "
        f"{r['fallbacks']} fallbacks, {r['skipped_images']} unreadable)"
    ]
    if "sweep" in r:
        b = r["sweep"]["best"]
        lines.append(
            f"sweep best: CorLoc {_pct(b['corloc'])} (layer {b['layer']}, {b['kind']}, normalize {b['normalize']}, "
            f"bias {b['gram_bias']}) over {len(r['sweep']['settings'])} settings"
        )
    return lines


def _group(entry: dict | None, key: str, fmt: Callable[[Any], str]) -> str:
    return "n/a" if not entry else fmt(entry[key])


def local_lines(r: dict) -> list[str]:
    pos, rec = r["position"], r["reconstruction"]
    lines = [
        f"outliers: {100 * r['outlier_fraction']:.2f}% of patch tokens ({r['detector']} threshold "
        f"{_num(r['threshold'])}, layer {r['layer']}, {r['num_images']} images)",
        f"position top-1: normal {_group(pos['normal'], 'top1', _pct)}, outlier {_group(pos['outlier'], 'top1', _pct)}"
        f" (chance {_pct(pos['chance_top1'])})",
        f"position distance: normal {_group(pos['normal'], 'mean_distance', _num)}, "
        f"outlier {_group(pos['outlier'], 'mean_distance', _num)} patches",
        f"reconstruction MSE: normal {_group(rec['normal'], 'mse', _num)}, outlier {_group(rec['outlier'], 'mse', _num)}",
    ]
    if pos.get("note"):
        lines.append(pos["note"])
    return lines


def global_lines(r: dict) -> list[str]:
    lines = []
    for kind, entry in r["global"].items():
        if entry is None:
            lines.append(f"{kind:>12}: n/a")
        else:
            lines.append(
                f"{kind:>12}: top-1 {_pct(entry['top1'])} +- {entry.get('std') or 0:.1f} ({entry['count']} images)"
            )
    return lines


def occlusion_lines(r: dict) -> list[str]:
    lines = []
    for key, entry in r["random"]["by_fraction"].items():
        lines.append(f"random PatchDrop {key}: final CLS correlation {_num(entry['final_cls'])}")
    for key, entry in r["faithfulness"]["by_fraction"].items():
        lines.append(
            f"drop {key} by CLS attention: most {_num(entry['most']['correlation'])}, least "
            f"{_num(entry['least']['correlation'])}, random {_num(entry['random']['correlation'])} "
            f"(gap {_num(entry['gap'])})"
        )
    return lines


def register_neuron_lines(r: dict) -> list[str]:
    head = (
        f"outliers at block {r['outlier_layer']} ({r['detector']} threshold {_num(r['threshold'])}): "
        f"{_pct(100 * r['outlier_fraction'])} of patches, in {r['images_with_outliers']}/{r['num_images']} images"
    )
    top = ", ".join(f"{n['layer']}:{n['neuron']} ({_num(n['score'])})" for n in r["neurons"][:5])
    return [head, f"top neurons (block:neuron (mean |act| at outliers)): {top or r.get('note', 'none')}"]


def ttr_lines(r: dict) -> list[str]:
    """One line per metric: plain -> TTR (-> compare)."""
    versions = list(r["metrics"])
    found = r["detection"]
    source = found.get("from") or f"found at block {found['outlier_layer']} ({found['detector']})"
    lines = [f"{len(r['neurons'])} register neurons ({source}), {r['num_test_time_registers']} test-time register(s)"]
    if r.get("note"):
        lines.append(r["note"])
    lines.append(f"{'metric':<26}" + "".join(f"{v:>12}" for v in versions))
    for key in r["metrics"][versions[0]]:
        row = "".join(f"{_num(r['metrics'][v].get(key), 4):>12}" for v in versions)
        lines.append(f"{key:<26}{row}")
    return lines


# the columns of the ablation table, when measured (ablate.json holds every number)
ABLATE_COLUMNS = (
    ("knn_top1", "kNN"),
    ("linear_top1", "linear"),
    ("lost_corloc", "CorLoc"),
    ("emergence_layer", "emerge"),
    ("patch_outlier_fraction", "outl.frac"),
    ("patch_norm_max", "norm max"),
    ("cls_to_outliers", "cls->outl"),
)


def ablate_lines(r: dict) -> list[str]:
    columns = [(key, name) for key, name in ABLATE_COLUMNS if key in r["baseline"]]
    ref = r["reference"]
    lines = [
        f"{len(r['blocks'])} block(s) edited, statistics of {ref['reference_images']} reference images "
        f"({ref['source']}); change vs baseline:",
        f"{'target/replacement':<20}" + "".join(f"{name:>11}" for _, name in columns),
        f"{'baseline (value)':<20}" + "".join(f"{_num(r['baseline'][key], 4):>11}" for key, _ in columns),
    ]
    for row in r["rows"]:
        cells = "".join(
            f"{'n/a' if row['change'][key] is None else format(row['change'][key], '+.3g'):>11}" for key, _ in columns
        )
        lines.append(f"{row['target'] + '/' + row['replacement']:<20}{cells}")
    return lines + list(r["notes"])

"""Artifact statistics from a ``Capture``: norms, outliers, emergence, positions, attention, registers.

``compute_statistics`` returns a JSON-ready record (lists indexed by layer 0..L, see ``capture``) and
a few small per-image maps for pictures. Outlier thresholds are fitted per layer on the pooled
patch + register norms, with the patches as the normal population (their median, MAD and mode), and
applied to both, so registers that absorb the high norms show up as register outliers while the
patches stay clean.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vitreg.telemetry.capture import Capture
from vitreg.telemetry.detectors import DETECTORS, DetectorSettings, bimodality_coefficient, thresholds

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
# Fixed log-spaced histogram edges, so histograms of any run, layer and step can be compared.
HIST_EDGES = np.logspace(-1, 4, 51)
STREAMS = ("prenorm", "postnorm")  # the residual stream before the final norm, or after it


@dataclass
class TelemetrySettings:
    """How artifacts are measured: the ``telemetry`` section of conf/analyze.yaml and the measuring keys of
    ``callbacks.telemetry`` (conf/callbacks/default.yaml), whose Hydra schema node this class is."""

    attention: bool = True  # recompute attention (math path) for entropy, sink mass and maps
    stream: str = "prenorm"  # the norms outliers are detected on: prenorm (residual stream) | postnorm
    detector: str = "valley"  # the headline detector: emergence, position map, attention split
    fixed_cutoff: float = DetectorSettings.fixed_cutoff
    robust_z: float = DetectorSettings.robust_z
    emergence_fraction: float = 0.005  # a layer "has artifacts" when its outlier fraction exceeds this
    identical_cosine: float = 0.99  # registers this similar (mean over images) are flagged identical
    # a channel whose mean |x| over patches and images exceeds this many times the median channel's is an outlier
    # (DINOv3 appendix A.2: a few channels grow with depth and training, constant over patches and images)
    channel_outlier_ratio: float = 10.0
    num_maps: int = 4  # probe images whose per-patch maps are kept for pictures
    chunk_size: int = 16  # images per probe forward (bounds the recomputed attention's memory)
    # register neurons (Jiang et al. 2025): FFN units firing at the outliers, found by one extra probe pass
    register_neurons: bool = True
    neuron_top_k: int = 10  # neurons kept per measurement, by ratio (mean |act| at outliers / elsewhere)
    neuron_outlier_layer: int = -2  # block whose output's headline-detector outliers are the positions
    neuron_highest_layer: int | None = None  # last block searched; null: round(depth * 17 / 24)
    # the extra pass scores the first this many probe images that have outliers (its cost); null: every image
    neuron_num_images: int | None = 16

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ValueError(f"telemetry stream must be prenorm or postnorm, got {self.stream!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"telemetry detector must be one of {DETECTORS}, got {self.detector!r}")
        if isinstance(self.neuron_top_k, bool) or not isinstance(self.neuron_top_k, int) or self.neuron_top_k < 1:
            raise ValueError(f"telemetry neuron_top_k must be an integer >= 1, got {self.neuron_top_k!r}")
        n = self.neuron_num_images
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"telemetry neuron_num_images must be an integer >= 1 or null (every image), got {n!r}")
        for key in ("neuron_outlier_layer", "neuron_highest_layer"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(
                    f"telemetry {key} must be a block index (0..depth-1, or -1..-depth from the end), got {value!r}"
                )

    @property
    def detectors(self) -> DetectorSettings:
        """The detectors' parameters; the valley detector's own keep their defaults."""
        return DetectorSettings(fixed_cutoff=self.fixed_cutoff, robust_z=self.robust_z)


def _quantiles(values: Tensor) -> dict[str, float]:
    x = values.double().flatten()
    if x.numel() == 0:
        return {k: math.nan for k in QUANTILES}
    return {k: float(torch.quantile(x, q)) if q < 1 else float(x.max()) for k, q in QUANTILES.items()}


def _per_layer(values: list[dict[str, float]]) -> dict[str, list[float]]:
    return {k: [v[k] for v in values] for k in QUANTILES}


def _json_float(x: float) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else float(x)


def _entropy(p: Tensor) -> Tensor:
    """Normalised entropy (0..1) of distributions along the last axis."""
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(p * p.clamp(min=1e-12).log()).sum(-1) / math.log(max(p.shape[-1], 2))


def _clip(norms: Tensor) -> np.ndarray:
    return norms.double().numpy().clip(HIST_EDGES[0], HIST_EDGES[-1])


def _norm_summary(cap: Capture, stream: str) -> dict:
    patch, reg = cap.layout.patches_slice, cap.layout.registers_slice
    norms = [getattr(layer, f"{stream}_norms") for layer in cap.layers]
    out = {
        "patch": _per_layer([_quantiles(n[:, patch]) for n in norms]),
        "cls": _per_layer([_quantiles(n[:, 0]) for n in norms]),
        # norms outside the edges land in the first/last bin, so every token is counted
        "histogram": [np.histogram(_clip(n[:, patch]), bins=HIST_EDGES)[0].tolist() for n in norms],
    }
    if cap.num_registers:
        out["register"] = _per_layer([_quantiles(n[:, reg]) for n in norms])
        # per register index (median over images): App. D.1's "quantised" register norms
        out["per_register_median"] = [n[:, reg].median(dim=0).values.tolist() for n in norms]
    return out


def _outliers(cap: Capture, s: TelemetrySettings) -> tuple[dict, dict[str, list[Tensor]]]:
    """Per detector and layer: threshold and outlier fractions of patches and registers; also the
    boolean (B, P) patch-outlier masks per detector and layer."""
    patch, reg = cap.layout.patches_slice, cap.layout.registers_slice
    summary = {d: {"threshold": [], "patch_fraction": [], "register_fraction": []} for d in DETECTORS}
    masks: dict[str, list[Tensor]] = {d: [] for d in DETECTORS}
    for layer in cap.layers:
        norms = getattr(layer, f"{s.stream}_norms")
        pooled = norms[:, 1:]  # patches and registers, not CLS; the patches are the normal population
        # tokens of norm 0 (registers zeroed by an ablation) are no population: they would stretch the log-norm fit
        pooled = pooled[pooled > 0] if bool((pooled == 0).any()) else pooled
        for name, thr in thresholds(pooled, s.detectors, bulk=norms[:, patch]).items():
            patch_mask = norms[:, patch] > thr
            masks[name].append(patch_mask)
            summary[name]["threshold"].append(_json_float(thr))
            summary[name]["patch_fraction"].append(float(patch_mask.float().mean()))
            reg_mask = norms[:, reg] > thr
            summary[name]["register_fraction"].append(float(reg_mask.float().mean()) if cap.num_registers else None)
    return summary, masks


def _channel_outliers(cap: Capture, ratio: float) -> dict:
    """Per layer: how many channels have a mean |x| over patches and images above ``ratio`` times the median
    channel's, the largest such ratio, and which channels (the last layer's, largest first)."""
    counts, peaks, last = [], [], []
    for layer in cap.layers:
        per_channel = layer.channel_mean_abs.mean(0)  # (D,)
        relative = per_channel / per_channel.median().clamp(min=1e-12)
        outlying = (relative > ratio).nonzero().flatten()
        counts.append(int(outlying.numel()))
        peaks.append(float(relative.max()))
        last = outlying[relative[outlying].argsort(descending=True)].tolist()
    return {"count": counts, "max_ratio": peaks, "last_layer_channels": last}


def _emergence(fractions: list[float], epsilon: float) -> int | None:
    return next((layer for layer, f in enumerate(fractions) if f > epsilon), None)


def _attention(cap: Capture, outlier_mask: Tensor) -> dict[str, list[float | None]]:
    """Per layer, averaged over images and heads: CLS entropy over patches and where attention lands."""
    patch, reg = cap.layout.patches_slice, cap.layout.registers_slice
    keys = ("cls_entropy", "cls_to_cls", "cls_to_registers", "cls_to_outliers", "cls_to_normals")
    keys += ("all_to_cls", "all_to_registers", "all_to_outliers", "all_to_normals", "heads_argmax_outlier_or_register")
    keys += ("cls_to_sink", "all_to_sink")  # the attention-bias sink (model.attn_bias=kv); None without one
    out: dict[str, list[float | None]] = {key: [None] for key in keys}  # layer 0 has no attention
    outlier = outlier_mask.float()[:, None]  # (B, 1, P)
    normal = 1.0 - outlier
    for layer in cap.layers[1:]:
        if layer.cls_attention is None:
            for key in keys:
                out[key].append(None)
            continue
        for prefix, att in (("cls", layer.cls_attention), ("all", layer.received_attention)):
            patches = att[..., patch]
            out[f"{prefix}_to_cls"].append(float(att[..., 0].mean()))
            out[f"{prefix}_to_registers"].append(float(att[..., reg].sum(-1).mean()))
            out[f"{prefix}_to_outliers"].append(float((patches * outlier).sum(-1).mean()))
            out[f"{prefix}_to_normals"].append(float((patches * normal).sum(-1).mean()))
        sink = layer.sink_attention  # (B, H, T): each query's mass on the sink, like a register's
        out["cls_to_sink"].append(float(sink[..., 0].mean()) if sink is not None else None)
        out["all_to_sink"].append(float(sink.mean()) if sink is not None else None)
        out["cls_entropy"].append(float(_entropy(layer.cls_attention[..., patch]).mean()))
        # a head "sinks" when the CLS query's strongest key is a register or an outlier patch
        top = layer.cls_attention[..., 1:].argmax(-1)  # (B, H) over registers + patches
        is_register = top < cap.num_registers
        patch_index = (top - cap.num_registers).clamp(min=0)
        is_outlier = outlier_mask.gather(1, patch_index) & ~is_register
        out["heads_argmax_outlier_or_register"].append(float((is_register | is_outlier).float().mean()))
    return out


def _register_health(cap: Capture, s: TelemetrySettings, outliers: dict) -> dict | None:
    if not cap.num_registers:
        return None
    last = cap.layers[-1].prefix_postnorm  # (B, 1 + R, D)
    unit = torch.nn.functional.normalize(last.double(), dim=-1)
    cos = (unit[:, 1:] @ unit[:, 1:].transpose(1, 2)).mean(0)  # (R, R), mean over images
    with_cls = (unit[:, 1:] * unit[:, :1]).sum(-1).mean(0)  # (R,)
    r = cap.num_registers
    off_diag = cos[~torch.eye(r, dtype=torch.bool)] if r > 1 else torch.zeros(0, dtype=torch.float64)
    last_norms = getattr(cap.layers[-1], f"{s.stream}_norms")
    head = outliers[s.detector]
    patch_median = float(last_norms[:, cap.layout.patches_slice].median())
    register_fraction = head["register_fraction"][-1]
    health = {
        "cosine": cos.tolist(),
        "cosine_max": float(off_diag.max()) if off_diag.numel() else None,
        "cosine_mean": float(off_diag.mean()) if off_diag.numel() else None,
        "cosine_with_cls": with_cls.tolist(),
        "identical": bool(off_diag.numel() and float(off_diag.max()) >= s.identical_cosine),
        # per register: its median norm over images / the median patch norm (last layer)
        "norm_ratio": (
            last_norms[:, cap.layout.registers_slice].median(dim=0).values / max(patch_median, 1e-12)
        ).tolist(),
        "absorbing": bool(
            register_fraction is not None
            and register_fraction >= 0.5
            and head["patch_fraction"][-1] <= s.emergence_fraction
        ),
    }
    learned = 0 if cap.register_params is None else cap.register_params.shape[0]  # < r with test-time registers
    if learned > 1:
        p = torch.nn.functional.normalize(cap.register_params.double(), dim=-1)
        pc = p @ p.T
        health["param_cosine_max"] = float(pc[~torch.eye(learned, dtype=torch.bool)].max())
    return health


def compute_statistics(cap: Capture, s: TelemetrySettings | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(record, maps). ``record`` is JSON-ready; ``maps`` holds per-image arrays of the first
    ``num_maps`` probe images: ``norm`` (n, h, w) last-layer patch norms, ``cls_attention`` (n, h, w)
    and ``register_attention`` (n, R, h, w) of the last block (mean over heads), and the
    ``position_frequency`` (h, w) of last-layer outliers over all probe images."""
    s = s or TelemetrySettings()
    h, w = cap.grid
    patch = cap.layout.patches_slice
    b = cap.layers[0].prenorm_norms.shape[0]
    outliers, masks = _outliers(cap, s)
    head_masks = masks[s.detector]
    last_mask = head_masks[-1]  # (B, P): the artifacts, as the headline detector sees them at the output
    position_frequency = last_mask.float().mean(0).view(h, w)
    stream_norms = [getattr(layer, f"{s.stream}_norms") for layer in cap.layers]
    cos = cap.neighbour_cosine.flatten(1)  # (B, P)
    record = {
        "num_images": b,
        "grid": [h, w],
        "depth": cap.depth,
        "num_registers": cap.num_registers,
        "stream": s.stream,
        "detector": s.detector,
        "settings": {
            "emergence_fraction": s.emergence_fraction,
            "identical_cosine": s.identical_cosine,
            "channel_outlier_ratio": s.channel_outlier_ratio,
            **dataclasses.asdict(s.detectors),
        },
        "norms": {"prenorm": _norm_summary(cap, "prenorm"), "postnorm": _norm_summary(cap, "postnorm")},
        "histogram_edges": HIST_EDGES.tolist(),
        "outliers": outliers,
        "emergence_layer": {d: _emergence(outliers[d]["patch_fraction"], s.emergence_fraction) for d in DETECTORS},
        "max_median_ratio": [float(n[:, patch].max() / n[:, patch].median().clamp(min=1e-12)) for n in stream_norms],
        "bimodality": [_json_float(bimodality_coefficient(n[:, patch].clamp(min=1e-12).log())) for n in stream_norms],
        "massive_activation_ratio": [
            layer.max_abs_activation / max(layer.median_abs_activation, 1e-12) for layer in cap.layers
        ],
        "position_frequency": position_frequency.tolist(),
        # the locality drift DINOv3 made Gram anchoring for (its sec. 4.1): CLS and patches grow alike
        "cls_patch_cosine": [float(layer.cls_patch_cosine.mean()) for layer in cap.layers],
        "channel_outliers": _channel_outliers(cap, s.channel_outlier_ratio),
        "redundancy": {
            "outlier_neighbour_cosine": float(cos[last_mask].mean()) if last_mask.any() else None,
            "normal_neighbour_cosine": float(cos[~last_mask].mean()) if (~last_mask).any() else None,
        },
        "attention": _attention(cap, last_mask),
        "registers": _register_health(cap, s, outliers),
    }
    n = min(s.num_maps, b)
    last = cap.layers[-1]
    maps = {
        "norm": getattr(last, f"{s.stream}_norms")[:n, patch].reshape(n, h, w).numpy(),
        "outliers": last_mask[:n].reshape(n, h, w).numpy(),
        "position_frequency": position_frequency.numpy(),
    }
    if last.cls_attention is not None:
        maps["cls_attention"] = last.cls_attention[:n, :, patch].mean(1).reshape(n, h, w).numpy()
        if cap.num_registers:
            maps["register_attention"] = last.register_attention[:n, :, patch].reshape(n, -1, h, w).numpy()
    return record, maps

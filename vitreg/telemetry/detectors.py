"""High-norm ("artifact") token detectors on a 1-D sample of token norms.

Each detector returns a norm threshold: tokens strictly above it are outliers. ``inf`` means the
detector found none. The paper's fixed cutoff (150) is specific to DINOv2-g, so two adaptive
detectors need no hand-picked value:

- ``robust_z``: ``median + k * 1.4826 * MAD`` (a robust z-score above ``k``);
- ``valley``: the deepest valley between the main mode of the log-norm histogram and a second,
  higher mode. It answers "is the distribution bimodal, and where does it split?" and returns
  ``inf`` when there is no second mode, so a unimodal long tail flags nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DETECTORS = ("fixed", "robust_z", "valley")

# Scale from the median absolute deviation to the standard deviation of a normal distribution.
MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class DetectorSettings:
    """Parameters of the three detectors (see ``conf/callbacks/telemetry`` for their meaning)."""

    fixed_cutoff: float = 150.0
    robust_z: float = 6.0
    valley_bins: int = 64
    valley_smoothing: float = 1.5  # Gaussian sigma of the histogram smoothing, in bins
    valley_depth: float = 0.5  # the valley must be at most this fraction of the second mode's height
    valley_min_mode_ratio: float = 2.0  # the second mode's norm must be at least this times the main one's
    valley_min_count: int = 5  # ... and hold at least this many tokens
    valley_min_fraction: float = 0.0005  # ... and at least this fraction of all tokens


def fixed_threshold(norms: Tensor, cutoff: float) -> float:
    return float(cutoff)


def robust_z_threshold(norms: Tensor, k: float) -> float:
    """``median + k * 1.4826 * MAD``. A zero MAD (over half the tokens share one norm) falls back to
    a tiny relative spread, so exact ties are never outliers but anything clearly above them is."""
    x = norms.double().flatten()
    if x.numel() == 0:
        return math.inf
    median = x.median()
    mad = (x - median).abs().median()
    spread = torch.clamp(MAD_TO_STD * mad, min=1e-6 * median.abs().clamp(min=1e-12))
    return float(median + k * spread)


def _smooth(hist: Tensor, sigma: float) -> Tensor:
    if sigma <= 0:
        return hist
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=hist.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return torch.nn.functional.conv1d(hist[None, None], kernel[None, None], padding=radius)[0, 0]


def valley_threshold(norms: Tensor, s: DetectorSettings = DetectorSettings(), bulk: Tensor | None = None) -> float:
    """Split point between the main mode of ``log(norms)`` and a higher second mode, or ``inf``.

    ``bulk`` (default: ``norms``) is the population whose mode is "normal": telemetry passes the
    patch norms, so a crowd of identical register norms can never become the main mode.

    A second mode counts when (a) its smoothed height is a local maximum right of the main mode,
    (b) the lowest smoothed point between them is at most ``valley_depth`` times its height,
    (c) its centre is at least ``valley_min_mode_ratio`` times the main mode's norm, and (d) it
    holds at least ``max(valley_min_count, valley_min_fraction * n)`` tokens. Among qualifying
    modes the most prominent wins; the threshold is the centre of the valley's lowest bin.
    """
    x = norms.double().flatten().clamp(min=1e-12).log()
    n = x.numel()
    min_mass = max(s.valley_min_count, s.valley_min_fraction * n)
    if n < 2 * min_mass or n < 10:
        return math.inf
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < math.log(s.valley_min_mode_ratio):
        return math.inf  # everything within a factor of the mode ratio: nothing can be a second mode
    bins = s.valley_bins
    width = (hi - lo) / bins
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    smooth = _smooth(counts, s.valley_smoothing)
    centres = lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    if bulk is None:
        main = int(smooth.argmax())
    else:
        bulk_log = bulk.double().flatten().clamp(min=1e-12).log()
        main = int(_smooth(torch.histc(bulk_log, bins=bins, min=lo, max=hi), s.valley_smoothing).argmax())
    best: tuple[float, int] | None = None  # (prominence, valley bin)
    for peak in range(main + 1, bins):
        left = smooth[peak - 1]
        right = smooth[peak + 1] if peak + 1 < bins else -1.0
        if not (smooth[peak] > left and smooth[peak] >= right):
            continue
        between = smooth[main : peak + 1]
        valley = main + int(between.argmin())
        depth = float(smooth[valley])
        height = float(smooth[peak])
        if depth > s.valley_depth * height:
            continue
        if float(centres[peak] - centres[main]) < math.log(s.valley_min_mode_ratio):
            continue
        mass = float(counts[valley + 1 :].sum())
        if mass < min_mass or mass >= n / 2:
            continue
        prominence = height - depth
        if best is None or prominence > best[0]:
            best = (prominence, valley)
    if best is None:
        return math.inf
    return float(math.exp(float(centres[best[1]])))


def thresholds(norms: Tensor, s: DetectorSettings = DetectorSettings(), bulk: Tensor | None = None) -> dict[str, float]:
    """The threshold of every detector in ``DETECTORS`` for this sample of norms.

    ``bulk`` (default ``norms``) is the normal population the adaptive detectors model: the robust
    z-score takes its median and MAD, the valley detector its main mode."""
    bulk = norms if bulk is None else bulk
    return {
        "fixed": fixed_threshold(norms, s.fixed_cutoff),
        "robust_z": robust_z_threshold(bulk, s.robust_z),
        "valley": valley_threshold(norms, s, bulk=bulk),
    }


def bimodality_coefficient(values: Tensor) -> float:
    """Sarle's bimodality coefficient of ``values``: > 5/9 (0.555) suggests two modes. NaN for n < 4."""
    x = values.double().flatten()
    n = x.numel()
    if n < 4:
        return math.nan
    centred = x - x.mean()
    var = centred.pow(2).mean()
    if var <= 0:
        return math.nan
    skew = centred.pow(3).mean() / var.pow(1.5)
    kurt = centred.pow(4).mean() / var.pow(2) - 3.0  # excess kurtosis
    # sample-size corrected skewness and excess kurtosis, as in Sarle's formula
    g = skew * math.sqrt(n * (n - 1)) / (n - 2)
    k = ((n + 1) * kurt + 6) * (n - 1) / ((n - 2) * (n - 3))
    return float((g**2 + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))

import math

import numpy as np
import pytest
import torch

from vitreg.telemetry.detectors import (
    DetectorSettings,
    bimodality_coefficient,
    robust_z_threshold,
    thresholds,
    valley_threshold,
)


def bimodal(n_normal: int = 4000, n_high: int = 80, ratio: float = 10.0, seed: int = 0) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    normal = torch.exp(torch.randn(n_normal, generator=g, dtype=torch.float64) * 0.2) * 30
    high = torch.exp(torch.randn(n_high, generator=g, dtype=torch.float64) * 0.1) * 30 * ratio
    return torch.cat([normal, high]), float(normal.max())


def test_robust_z_matches_its_formula():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    median, mad = 3.0, 1.0  # |x - 3| = 2, 1, 0, 1, 97 -> median 1
    assert robust_z_threshold(x, 6.0) == pytest.approx(median + 6.0 * 1.4826 * mad)


def test_robust_z_with_zero_mad_flags_only_what_is_above_the_ties():
    x = torch.tensor([5.0] * 10 + [5.5])
    thr = robust_z_threshold(x, 6.0)
    assert 5.0 <= thr < 5.5


@pytest.mark.parametrize("ratio", [5.0, 10.0, 50.0])
def test_valley_splits_a_bimodal_sample_between_the_modes(ratio):
    x, normal_max = bimodal(ratio=ratio)
    thr = valley_threshold(x)
    assert normal_max < thr < 30 * ratio * math.exp(-0.4)
    assert int((x > thr).sum()) == 80


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.6])
def test_valley_finds_nothing_in_a_unimodal_long_tail(sigma):
    g = torch.Generator().manual_seed(1)
    x = torch.exp(torch.randn(20000, generator=g, dtype=torch.float64) * sigma) * 30
    assert math.isinf(valley_threshold(x))


def test_valley_ignores_a_handful_of_stragglers():
    x, _ = bimodal(n_high=3)  # below valley_min_count
    assert math.isinf(valley_threshold(x))


def test_valley_needs_a_second_mode_at_least_mode_ratio_away():
    x, _ = bimodal(ratio=1.6)  # a bump at 1.6x the main mode is not an artifact mode
    assert math.isinf(valley_threshold(x, DetectorSettings(valley_min_mode_ratio=2.0)))


def test_valley_uses_the_bulk_for_the_main_mode():
    # 50 identical tiny register norms would be the tallest bin; the patches are still the bulk
    patches, _ = bimodal(n_normal=400, n_high=0)
    regs = torch.full((50,), 1e-3, dtype=torch.float64)
    pooled = torch.cat([patches, regs])
    assert math.isinf(valley_threshold(pooled, bulk=patches))  # nothing above the patches


def test_thresholds_has_every_detector():
    x, normal_max = bimodal()
    out = thresholds(x, DetectorSettings(fixed_cutoff=150.0))
    assert out["fixed"] == 150.0
    assert out["robust_z"] > normal_max * 0.5 and out["valley"] > normal_max


def reference_bimodality(x: np.ndarray) -> float:
    n = len(x)
    m = x.mean()
    m2, m3, m4 = ((x - m) ** 2).mean(), ((x - m) ** 3).mean(), ((x - m) ** 4).mean()
    g1 = m3 / m2**1.5
    g2 = m4 / m2**2 - 3
    G1 = np.sqrt(n * (n - 1)) / (n - 2) * g1
    G2 = (n - 1) / ((n - 2) * (n - 3)) * ((n + 1) * g2 + 6)
    return (G1**2 + 1) / (G2 + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def test_bimodality_coefficient_matches_sarles_formula_and_separates_shapes():
    rng = np.random.default_rng(0)
    uni = rng.normal(size=5000)
    bi = np.concatenate([rng.normal(-3, 1, 2500), rng.normal(3, 1, 2500)])
    for x in (uni, bi, rng.exponential(size=300)):
        assert bimodality_coefficient(torch.from_numpy(x)) == pytest.approx(reference_bimodality(x), rel=1e-9)
    assert bimodality_coefficient(torch.from_numpy(uni)) < 5 / 9 < bimodality_coefficient(torch.from_numpy(bi))
    assert math.isnan(bimodality_coefficient(torch.ones(3)))

"""Outlier-token probes: known answers on constructed token sets, and outlier grouping on planted ViTs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.telemetry.planted import planted_vit, probe_images
from vitreg.data.transforms import normalize
from vitreg.eval.token_probes import (
    TokenSet,
    collect_tokens,
    global_probe,
    grid_coordinates,
    local_probes,
    patch_pixels,
    plot_token_probes,
    position_probe,
    reconstruction_probe,
    split_images,
    uniform_mean_distance,
)


def token_set(patches, *, grid, pixels=None, outliers=None, cls=None, registers=None) -> TokenSet:
    n, p, d = patches.shape
    outliers = torch.zeros(n, p, dtype=torch.bool) if outliers is None else outliers
    return TokenSet(
        patches=patches,
        pixels=torch.zeros(n, p, 12) if pixels is None else pixels,
        norms=patches.norm(dim=-1),
        outliers=outliers,
        cls=torch.zeros(n, d) if cls is None else cls,
        registers=torch.zeros(n, 0, d) if registers is None else registers,
        grid=grid,
        threshold=1.0,
        detector="fixed",
        layer=11,
    )


def planted_outliers(n: int, p: int, positions: list[int]) -> torch.Tensor:
    mask = torch.zeros(n, p, dtype=torch.bool)
    mask[:, positions] = True
    return mask


# ------------------------------------------------------------------------------------------ helpers


def test_uniform_mean_distance_matches_hand_values():
    assert uniform_mean_distance((1, 2)) == pytest.approx(0.5)  # pairs: 0, 1, 1, 0
    # 2x2: 4 pairs at 0, 8 at distance 1, 4 at sqrt(2)
    assert uniform_mean_distance((2, 2)) == pytest.approx((8 + 4 * math.sqrt(2)) / 16)
    xy = grid_coordinates((3, 5))
    brute = sum(math.dist(a, b) for a in xy.tolist() for b in xy.tolist()) / 15**2
    assert uniform_mean_distance((3, 5)) == pytest.approx(brute)
    assert xy[7].tolist() == [1.0, 2.0]  # row-major: index 7 of a 5-wide grid is row 1, column 2


def test_split_images_is_seeded_disjoint_and_complete():
    train, test = split_images(20, 0.3, seed=1)
    assert len(test) == 6 and len(train) == 14
    assert sorted(train.tolist() + test.tolist()) == list(range(20))
    assert torch.equal(split_images(20, 0.3, seed=1)[1], test)
    assert not torch.equal(split_images(20, 0.3, seed=2)[1], test)


def test_patch_pixels_feed_the_patch_embedding_exactly():
    """The pixel rows are what the model's patch embedding multiplies: conv == pixels @ W^T + b."""
    model = planted_vit(num_registers=0)
    x = torch.randn(2, 3, 112, 112)
    pixels = patch_pixels(x, 14)  # (2, 64, 588)
    conv = model.patch_embed.proj
    expected = model.patch_embed(x)
    got = pixels @ conv.weight.reshape(conv.weight.shape[0], -1).T + conv.bias
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ position probe


@pytest.mark.parametrize("fit_on", ["all", "group"])
def test_position_codes_give_perfect_accuracy(fit_on):
    g = torch.Generator().manual_seed(0)
    grid, n, d = (4, 4), 30, 32
    codes = torch.randn(16, d, generator=g)
    patches = codes.expand(n, -1, -1) + 0.01 * torch.randn(n, 16, d, generator=g)
    tokens = token_set(patches, grid=grid, outliers=planted_outliers(n, 16, [0, 5, 15]))
    res = position_probe(tokens, fit_on=fit_on, min_outliers=5)
    for group in ("normal", "outlier"):
        assert res[group]["top1"] == 100.0
        assert res[group]["mean_distance"] == 0.0
    assert res["outlier"]["count"] == 3 * 9  # 9 test images x 3 outlier positions
    assert res["normal"]["count"] == 13 * 9
    assert res["chance_top1"] == 100 / 16


def test_position_independent_features_are_at_chance():
    g = torch.Generator().manual_seed(1)
    grid, n = (4, 4), 200
    tokens = token_set(torch.randn(n, 16, 8, generator=g), grid=grid)
    res = position_probe(tokens)
    assert res["normal"]["count"] == 60 * 16
    assert abs(res["normal"]["top1"] - 100 / 16) < 3.0
    assert res["normal"]["mean_distance"] == pytest.approx(uniform_mean_distance(grid), rel=0.1)
    assert res["chance_mean_distance"] == pytest.approx(uniform_mean_distance(grid))
    # no outliers at all: a null entry with an explanation, never a crash
    assert res["outlier"] is None and "min_outliers" in res["note"]


def test_position_outliers_without_position_information_are_worse():
    """Outlier tokens that forgot their position (the paper's finding) score lower with one shared model."""
    g = torch.Generator().manual_seed(2)
    n, d = 60, 32
    codes = torch.randn(16, d, generator=g)
    patches = codes.expand(n, -1, -1) + 0.01 * torch.randn(n, 16, d, generator=g)
    outliers = planted_outliers(n, 16, [2, 9])
    patches[outliers] = torch.randn(int(outliers.sum()), d, generator=g)  # position erased
    res = position_probe(token_set(patches, grid=(4, 4), outliers=outliers), min_outliers=5)
    assert res["normal"]["top1"] == 100.0
    assert res["outlier"]["top1"] < 40.0
    assert res["outlier"]["mean_distance"] > 0.5


# ------------------------------------------------------------------------------------------ reconstruction


def test_reconstruction_of_linear_tokens_is_exact_and_random_tokens_reach_pixel_variance():
    g = torch.Generator().manual_seed(3)
    n, p, m = 80, 16, 12
    pixels = torch.randn(n, p, m, generator=g)
    mixing = torch.randn(m, 24, generator=g)
    outliers = planted_outliers(n, p, [1, 4])
    linear = token_set(pixels @ mixing, grid=(4, 4), pixels=pixels, outliers=outliers)
    res = reconstruction_probe(linear, min_outliers=5)
    for group in ("normal", "outlier"):
        assert res[group]["mse"] < 1e-6
        assert res[group]["l2"] < 1e-3
        assert res[group]["baseline_mse"] == pytest.approx(1.0, rel=0.15)  # unit-variance pixels
    random_tokens = token_set(torch.randn(n, p, 24, generator=g), grid=(4, 4), pixels=pixels, outliers=outliers)
    res = reconstruction_probe(random_tokens, min_outliers=5)
    normal = res["normal"]
    assert normal["mse"] == pytest.approx(normal["baseline_mse"], rel=0.05)
    assert normal["mse"] == pytest.approx(1.0, rel=0.1)
    # the documented formulas, recomputed: mse is the mean squared error per value, l2 the mean patch distance
    assert normal["l2"] == pytest.approx(math.sqrt(m * normal["mse"]), rel=0.1)


# ------------------------------------------------------------------------------------------ global probe


@pytest.mark.parametrize("classifier", ["ridge", "logistic"])
def test_global_probe_label_carrying_tokens_and_chance(classifier):
    g = torch.Generator().manual_seed(4)
    n, p, d, k = 240, 16, 8, 4
    labels = torch.arange(n) % k
    codes = 3 * torch.randn(k, d, generator=g)
    cls = codes[labels] + 0.1 * torch.randn(n, d, generator=g)
    registers = torch.stack([codes[labels], torch.randn(n, d, generator=g)], dim=1)  # reg 0 knows, reg 1 not
    patches = torch.randn(n, p, d, generator=g)
    outliers = torch.zeros(n, p, dtype=torch.bool)
    outliers[::2, 3] = True  # every other image has one outlier, which carries the label
    patches[::2, 3] = codes[labels[::2]]
    tokens = token_set(patches, grid=(4, 4), outliers=outliers, cls=cls, registers=registers)
    res = global_probe(tokens, labels, classifier=classifier, repeats=3, C=1.0, alpha=1.0)
    out = res["global"]
    assert out["cls"]["top1"] == 100.0 and out["cls"]["std"] == 0.0
    assert out["register_0"]["top1"] == 100.0
    assert abs(out["register_1"]["top1"] - 25.0) < 15.0
    assert abs(out["normal"]["top1"] - 25.0) < 15.0
    assert out["outlier"]["top1"] == 100.0 and out["outlier"]["std"] == 0.0
    assert out["outlier"]["count"] == n // 2
    assert out["cls"]["count"] == n and out["cls"]["test_count"] == 72
    assert res["chance_top1"] >= 25.0
    json.dumps(res)


def test_global_probe_repeats_redraw_the_random_tokens():
    g = torch.Generator().manual_seed(5)
    n, p, d = 60, 16, 8
    labels = torch.arange(n) % 3
    patches = torch.randn(n, p, d, generator=g)
    patches[:, :8] += 4 * torch.nn.functional.one_hot(labels, d).float()[:, None]  # half the patches know
    tokens = token_set(patches, grid=(4, 4), cls=torch.randn(n, d, generator=g))
    res = global_probe(tokens, labels, classifier="ridge", repeats=4, alpha="auto")
    assert res["global"]["normal"]["std"] > 0.0  # the token choice matters here
    assert res["global"]["outlier"] is None and "outlier" in res["note"]
    assert "register_0" not in res["global"]


# ------------------------------------------------------------------------------------------ real models


def probe_batch(n: int) -> torch.Tensor:
    return torch.stack([normalize(img.float() / 255) for img in probe_images(n)])


def test_outlier_mask_is_exactly_the_planted_patches_and_registers_are_never_patches():
    planted = [3, 10, 40]
    model = planted_vit(num_registers=4, patches=planted, registers=[1])
    images = probe_batch(12)
    tokens = collect_tokens(model, images, batch_size=5)
    assert tokens.patches.shape == (12, 64, model.embed_dim)
    assert tokens.registers.shape == (12, 4, model.embed_dim)
    assert tokens.pixels.shape == (12, 64, 3 * 14 * 14)
    assert torch.equal(tokens.outliers, planted_outliers(12, 64, planted))
    out = model.forward_features(images)
    torch.testing.assert_close(tokens.norms, out["x_prenorm"][:, 5:].norm(dim=-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(tokens.patches, out["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.cls, out["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.registers, out["x_norm_regtokens"], atol=1e-5, rtol=1e-5)
    prenorm = collect_tokens(model, images, features="prenorm")
    torch.testing.assert_close(prenorm.patches.norm(dim=-1), tokens.norms)


def test_a_high_norm_register_is_not_a_patch_outlier():
    model = planted_vit(num_registers=4, patches=(), registers=[0, 2])
    tokens = collect_tokens(model, probe_batch(8), detector="robust_z")
    assert not tokens.outliers.any()
    assert tokens.registers[:, [0, 2]].norm(dim=-1).min() > 0  # the registers are there, just not patches


def test_fixed_cutoff_and_layer_selection():
    model = planted_vit(num_registers=0, patches=[7], block=5)
    images = probe_batch(6)
    late = collect_tokens(model, images, layer=8, detector="robust_z")
    assert torch.equal(late.outliers, planted_outliers(6, 64, [7])) and late.layer == 8
    early = collect_tokens(model, images, layer=3, detector="robust_z")  # before the planted block
    assert not early.outliers[:, 7].all()
    everything = collect_tokens(model, images, detector="fixed", cutoff=0.0)
    assert everything.outliers.all() and everything.threshold == 0.0
    with pytest.raises(ValueError, match="layer"):
        collect_tokens(model, images, layer=12)
    with pytest.raises(ValueError, match="detector"):
        collect_tokens(model, images, detector="zscore")


def test_model_without_outliers_gives_null_outlier_entries():
    model = planted_vit(num_registers=0)
    images = probe_batch(10)
    tokens = collect_tokens(model, images)
    assert tokens.threshold == math.inf and not tokens.outliers.any()
    local = local_probes(tokens, alpha=1.0)
    assert local["position"]["outlier"] is None and local["reconstruction"]["outlier"] is None
    assert "note" in local["position"] and local["threshold"] is None and local["outlier_fraction"] == 0.0
    glob = global_probe(tokens, torch.arange(10) % 2, classifier="ridge", alpha=1.0, repeats=2)
    assert glob["global"]["outlier"] is None and "note" in glob
    json.dumps(local), json.dumps(glob)


def test_probes_run_end_to_end_on_a_planted_model_and_plot(tmp_path):
    model = planted_vit(num_registers=4, patches=[3, 10, 40])
    images = probe_batch(16)
    tokens = collect_tokens(model, images)
    local = local_probes(tokens, alpha=10.0, min_outliers=5)
    assert local["position"]["outlier"]["count"] == 3 * 5
    assert local["outlier_fraction"] == pytest.approx(3 / 64)
    glob = global_probe(tokens, torch.arange(16) % 2, classifier="ridge", alpha=10.0, repeats=2, min_outliers=5)
    assert set(glob["global"]) == {"cls", "normal", "outlier", "register_0", "register_1", "register_2", "register_3"}
    path = plot_token_probes({**local, **glob}, tmp_path / "probes.png")
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="position"):
        plot_token_probes({}, tmp_path / "empty.png")

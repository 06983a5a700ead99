"""Multi-crop augmentation ops against independent float64 NumPy / colorsys references."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from vitreg.data import transforms as T
from vitreg.data.transforms import BLUR_PROBABILITIES, IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform

LUMA = np.array([0.299, 0.587, 0.114])


def random_image(h: int = 12, w: int = 15, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- multi-crop output
def test_multicrop_shapes_dtypes_and_range() -> None:
    img = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = MultiCropTransform(global_crops_size=56, local_crops_size=28, local_crops_number=3)(img)
    assert set(out) == {"global_crops", "local_crops"}
    assert [tuple(t.shape) for t in out["global_crops"]] == [(3, 56, 56)] * 2
    assert [tuple(t.shape) for t in out["local_crops"]] == [(3, 28, 28)] * 3
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for t in out["global_crops"] + out["local_crops"]:
        assert t.dtype == torch.float32
        assert (t >= lo.view(3, 1, 1) - 1e-5).all() and (t <= hi.view(3, 1, 1) + 1e-5).all()


def test_multicrop_zero_local_crops_and_bad_input() -> None:
    transform = MultiCropTransform(global_crops_size=28, local_crops_size=14, local_crops_number=0)
    assert transform(torch.zeros(3, 32, 32, dtype=torch.uint8))["local_crops"] == []
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        transform(torch.zeros(32, 32, 3, dtype=torch.uint8))


def test_multicrop_is_reproducible_with_a_generator() -> None:
    img = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    transform = MultiCropTransform(global_crops_size=28, local_crops_size=14, local_crops_number=2)
    a = transform(img, generator=torch.Generator().manual_seed(5))
    b = transform(img, generator=torch.Generator().manual_seed(5))
    c = transform(img, generator=torch.Generator().manual_seed(6))
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


# ---------------------------------------------------------------- geometry
def test_crop_box_statistics_follow_the_sampling_law() -> None:
    gen = torch.Generator().manual_seed(0)
    height = width = 112
    scale, ratio = (0.05, 0.32), (3 / 4, 4 / 3)
    fractions, log_aspects = [], []
    for _ in range(2000):
        top, left, h, w = T.sample_crop_box(height, width, scale, ratio, gen)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        # w and h are sqrt(area·aspect) and sqrt(area/aspect) rounded: undo at most half a pixel on each side.
        assert (w - 0.5) * (h - 0.5) <= scale[1] * height * width and (w + 0.5) * (h + 0.5) >= scale[0] * height * width
        assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
        fractions.append(h * w / (height * width))
        log_aspects.append(math.log(w / h))
    # Every attempt fits here (no fallback): area ~ U(scale), log-aspect ~ U(log ratio), symmetric about 0.
    assert np.mean(fractions) == pytest.approx(np.mean(scale), abs=0.006)
    assert np.quantile(fractions, 0.25) == pytest.approx(scale[0] + 0.25 * (scale[1] - scale[0]), abs=0.01)
    assert np.mean(log_aspects) == pytest.approx(0.0, abs=0.02)
    assert np.std(log_aspects) == pytest.approx(2 * math.log(4 / 3) / math.sqrt(12), rel=0.1)


def test_crop_box_fallback_is_the_clamped_central_crop() -> None:
    # A 10x200 strip cannot hold >= 90% of its area at aspect <= 4/3: all 10 attempts fail.
    gen = torch.Generator().manual_seed(0)
    assert T.sample_crop_box(10, 200, (0.9, 1.0), generator=gen) == (0, (200 - 13) // 2, 10, 13)
    assert T.sample_crop_box(200, 10, (0.9, 1.0), generator=gen) == ((200 - 13) // 2, 0, 13, 10)


def test_full_crop_at_native_size_is_the_image() -> None:
    img = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = T.random_resized_crop(img, 20, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(out, img.double().div(255).float(), rtol=0, atol=1e-6)


def test_resize_keeps_constants_and_range() -> None:
    const = torch.full((3, 30, 40), 77, dtype=torch.uint8)
    torch.testing.assert_close(T.resize(const, 14), torch.full((3, 14, 14), 77 / 255), rtol=0, atol=1e-6)
    checker = (torch.arange(40)[None, :] + torch.arange(40)[:, None]) % 2 * 255
    out = T.resize(checker.to(torch.uint8).expand(3, 40, 40), 97)  # upsampling overshoots before the clamp
    assert out.min() >= 0 and out.max() <= 1


def test_flip_is_an_exact_mirror() -> None:
    img = random_image()
    flipped = T.random_horizontal_flip(img, p=1.0)
    assert torch.equal(flipped, img[..., list(range(img.shape[-1] - 1, -1, -1))])
    assert torch.equal(T.random_horizontal_flip(img, p=0.0), img)


# ---------------------------------------------------------------- colour
def test_grayscale_is_the_luma_formula() -> None:
    img = random_image()
    expected = np.einsum("c,chw->hw", LUMA, img.double().numpy())
    out = T.rgb_to_grayscale(img)
    assert out.shape == img.shape
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), expected, atol=1e-6)


def test_brightness_contrast_saturation_formulas() -> None:
    img = random_image()
    x = img.double().numpy()
    luma = np.einsum("c,chw->hw", LUMA, x)
    for f in (0.6, 1.3):
        np.testing.assert_allclose(T.adjust_brightness(img, f).numpy(), np.clip(f * x, 0, 1), atol=1e-6)
        np.testing.assert_allclose(
            T.adjust_contrast(img, f).numpy(), np.clip(f * x + (1 - f) * luma.mean(), 0, 1), atol=1e-6
        )
        np.testing.assert_allclose(
            T.adjust_saturation(img, f).numpy(), np.clip(f * x + (1 - f) * luma, 0, 1), atol=1e-6
        )


def test_neutral_factors_are_identities() -> None:
    img = random_image()
    for op in (T.adjust_brightness, T.adjust_contrast, T.adjust_saturation):
        assert torch.equal(op(img, 1.0), img)
    torch.testing.assert_close(T.adjust_hue(img, 0.0), img, rtol=0, atol=1e-6)
    torch.testing.assert_close(T.color_jitter(img, 0.0, 0.0, 0.0, 0.0), img, rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", [0.07, -0.1, 0.5, -0.37])
def test_hue_matches_colorsys(factor: float) -> None:
    img = random_image(6, 7, seed=3)
    img[:, 0, :3] = torch.tensor([0.5, 0.5, 0.5])[:, None]  # grey pixels: hue undefined, must be unchanged
    img[:, 1, 0] = torch.tensor([0.9, 0.9, 0.2])  # a max tie between r and g
    expected = np.empty((3, 6, 7))
    for i in range(6):
        for j in range(7):
            h, s, v = colorsys.rgb_to_hsv(*img[:, i, j].double().tolist())
            expected[:, i, j] = colorsys.hsv_to_rgb((h + factor) % 1.0, s, v)
    np.testing.assert_allclose(T.adjust_hue(img, factor).numpy(), expected, atol=2e-6)


def _hue_reference(img: torch.Tensor, factor: float) -> torch.Tensor:
    """adjust_hue as first written (a fresh tensor per step): the in-place version must match it bit for bit."""
    r, g, b = img[..., 0:1, :, :], img[..., 1:2, :, :], img[..., 2:3, :, :]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv_chroma = chroma.clamp(min=1e-12).reciprocal_()
    is_r = (r - maxc).sign_().add_(1.0)
    is_g = (g - maxc).sign_().add_(1.0)
    hue6 = torch.lerp(
        torch.lerp(torch.add(r - g, chroma, alpha=4), torch.add(b - r, chroma, alpha=2), is_g), g - b, is_r
    )
    hue6 = hue6.mul_(inv_chroma).add_(6.0 * factor)
    hue6 = hue6.sub_(torch.floor(hue6 * (1.0 / 6.0)).mul_(6.0))
    out = torch.empty_like(img)
    for channel, centre in enumerate((3.0, 5.0, 1.0)):
        dist = (hue6 - centre).abs_()
        ramp = torch.maximum(2.0 - dist, dist.sub_(4.0)).clamp_(0.0, 1.0)
        torch.addcmul(maxc, chroma, ramp, value=-1.0, out=out[..., channel : channel + 1, :, :])
    return out


@pytest.mark.parametrize("shape", [(3, 224, 224), (3, 37, 98), (2, 3, 9, 11)])
def test_hue_is_bitwise_the_reference(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, shape, generator=gen).float() / 255
    img[..., 0, :3, :] = img[..., 1, :3, :]  # ties between channels
    img[..., :, 3:6, :] = img[..., 2:3, 3:6, :]  # grey pixels
    for factor in (0.1, -0.1, 0.037, -0.5, 0.5, 0.0):
        expected = _hue_reference(img, factor)
        assert torch.equal(T.adjust_hue(img, factor), expected)
        in_place = img.clone()
        assert T.adjust_hue(in_place, factor, out=in_place) is in_place
        assert torch.equal(in_place, expected)


def test_multicrop_is_the_same_on_a_channels_last_view() -> None:
    img = torch.randint(0, 256, (3, 61, 87), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    hwc_view = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for dtype in (torch.float32, torch.uint8):
        transform = MultiCropTransform(
            global_crops_size=32, local_crops_size=16, local_crops_number=2, output_dtype=dtype
        )
        assert transform.accepts_channels_last
        a = transform(img, generator=torch.Generator().manual_seed(5))
        b = transform(hwc_view, generator=torch.Generator().manual_seed(5))
        for key in a:
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))


def test_color_jitter_draws_factors_in_range() -> None:
    # Brightness alone with its range collapsed to one value is exactly that scaling.
    img = random_image()
    gen = torch.Generator().manual_seed(0)
    out = T.color_jitter(img, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, generator=gen)
    torch.testing.assert_close(out, img, rtol=0, atol=1e-6)
    ratios = []
    for _ in range(200):
        out = T.color_jitter(img * 0.5, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0, generator=gen)
        ratios.append((out / (img * 0.5)).mean().item())
    assert min(ratios) >= 0.6 - 1e-4 and max(ratios) <= 1.4 + 1e-4 and np.std(ratios) > 0.15


def test_solarize_formula() -> None:
    values = torch.arange(256, dtype=torch.float32) / 255
    out = T.solarize(values.view(1, 1, -1).expand(3, 1, -1))
    expected = np.where(np.arange(256) >= 128, (255 - np.arange(256)) / 255, np.arange(256) / 255)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6)


# ---------------------------------------------------------------- blur
def reference_blur(x: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """Direct 2-D correlation with a normalised 2-D Gaussian on a reflect-padded (no edge repeat) image."""
    half = kernel_size // 2
    offsets = np.arange(-half, half + 1)
    g = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    g /= g.sum()
    padded = np.pad(x, ((0, 0), (half, half), (half, half)), mode="reflect")
    out = np.zeros_like(x)
    for di in range(kernel_size):
        for dj in range(kernel_size):
            out += g[di, dj] * padded[:, di : di + x.shape[1], dj : dj + x.shape[2]]
    return out


@pytest.mark.parametrize(("shape", "sigma"), [((12, 15), 0.7), ((21, 21), 1.9), ((9, 9), 0.1)])
def test_blur_matches_reference(shape: tuple[int, int], sigma: float) -> None:
    img = random_image(*shape, seed=4)
    np.testing.assert_allclose(
        T.gaussian_blur(img, 9, sigma).numpy(), reference_blur(img.double().numpy(), 9, sigma), atol=2e-6
    )


def test_blur_of_impulse_is_the_separable_kernel_and_constants_are_kept() -> None:
    sigma = 1.3
    x = np.arange(-4, 5)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    img = torch.zeros(3, 21, 21)
    img[:, 10, 10] = 1.0
    out = T.gaussian_blur(img, 9, sigma)
    expected = np.zeros((21, 21))
    expected[6:15, 6:15] = np.outer(k, k)
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), expected, atol=1e-7)
    const = torch.full((3, 11, 13), 0.3)
    torch.testing.assert_close(T.gaussian_blur(const, 9, sigma), const, rtol=0, atol=1e-6)


def test_blur_rejects_too_small_images() -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        T.gaussian_blur(torch.zeros(3, 4, 4), 9, 1.0)


def test_normalize() -> None:
    img = random_image()
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(T.normalize(img).numpy(), (img.double().numpy() - mean) / std, atol=1e-5)


# ---------------------------------------------------------------- per-crop blur / solarize probabilities
def test_blur_probability_presets() -> None:
    assert BLUR_PROBABILITIES == {"dinov2": (0.0, 0.9, 0.5), "intended": (1.0, 0.1, 0.5)}
    t = MultiCropTransform(blur_probabilities="intended")
    assert (t.global1_blur_prob, t.global2_blur_prob, t.local_blur_prob) == (1.0, 0.1, 0.5)
    with pytest.raises(ValueError, match="blur_probabilities"):
        MultiCropTransform(blur_probabilities="fixed")


@pytest.mark.parametrize("preset", ["dinov2", "intended"])
def test_blur_and_solarize_rates_per_crop(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Count what actually happens to each crop slot (global1, global2, local, local) over many calls."""
    records: list[dict[str, bool]] = []
    real_random_blur, real_blur, real_solarize = T.random_gaussian_blur, T.gaussian_blur, T.solarize

    def random_blur(img, p, *args, **kwargs):  # one call per crop, in crop order
        records.append({"blur": False, "solarize": False})
        return real_random_blur(img, p, *args, **kwargs)

    def blur(img, *args, **kwargs):
        records[-1]["blur"] = True
        return real_blur(img, *args, **kwargs)

    def solarize(img, *args, **kwargs):
        records[-1]["solarize"] = True
        return real_solarize(img, *args, **kwargs)

    monkeypatch.setattr(T, "random_gaussian_blur", random_blur)
    monkeypatch.setattr(T, "gaussian_blur", blur)
    monkeypatch.setattr(T, "solarize", solarize)

    torch.manual_seed(0)
    transform = MultiCropTransform(16, 12, local_crops_number=2, blur_probabilities=preset)
    img = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    calls = 500
    for _ in range(calls):
        transform(img)
    assert len(records) == 4 * calls
    rates = {
        key: [np.mean([records[4 * i + slot][key] for i in range(calls)]) for slot in range(4)]
        for key in ("blur", "solarize")
    }
    p_g1, p_g2, p_local = BLUR_PROBABILITIES[preset]
    # Exact where the probability is 0 or 1; otherwise within ~4 binomial standard deviations.
    tol = 4 * math.sqrt(0.25 / calls)
    assert rates["blur"] == pytest.approx([p_g1, p_g2, p_local, p_local], abs=tol)
    assert rates["blur"][0] == p_g1
    assert rates["solarize"][0] == rates["solarize"][2] == rates["solarize"][3] == 0.0
    assert rates["solarize"][1] == pytest.approx(0.2, abs=tol)


def test_flip_rate_over_many_draws() -> None:
    from vitreg.data.transforms import random_horizontal_flip

    img = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # asymmetric left/right
    g = torch.Generator().manual_seed(0)
    flips = sum(not torch.equal(random_horizontal_flip(img, 0.5, g), img) for _ in range(4000))
    assert abs(flips / 4000 - 0.5) < 0.03
    assert all(torch.equal(random_horizontal_flip(img, 0.0, g), img) for _ in range(50))


def test_grey_images_skip_the_hue_op_with_the_same_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    plane = torch.randint(0, 256, (1, 70, 90), dtype=torch.uint8, generator=gen)
    transform = MultiCropTransform(global_crops_size=40, local_crops_size=20, local_crops_number=3)
    hues: list[float] = []
    for img in (plane.expand(3, -1, -1).contiguous(), plane.expand(3, -1, -1).float() / 255):
        assert T.is_grey(img) and not T.is_grey(random_image())
        monkeypatch.setattr(T, "adjust_hue", lambda x, f, out=None: hues.append(f) or x)
        fast = transform(img, generator=torch.Generator().manual_seed(11))
        monkeypatch.undo()
        monkeypatch.setattr(T, "is_grey", lambda img: False)
        slow = transform(img, generator=torch.Generator().manual_seed(11))
        monkeypatch.undo()
        assert hues == []  # never called on the grey image
        for key in fast:
            assert all(torch.equal(a, b) for a, b in zip(fast[key], slow[key], strict=True))


def test_color_jitter_grey_flag_is_exact_on_grey_crops() -> None:
    grey = random_image(20, 30).mean(dim=0, keepdim=True).expand(3, -1, -1).contiguous()
    for seed in range(12):  # every position of hue in the random order
        a = T.color_jitter(grey, generator=torch.Generator().manual_seed(seed))
        b = T.color_jitter(grey, generator=torch.Generator().manual_seed(seed), grey=True)
        assert torch.equal(a, b) and T.is_grey(b)

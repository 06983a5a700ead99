"""``decode_image`` on real files built here with PIL: formats, colour modes, JPEG draft scaling, every failure reason."""

from __future__ import annotations

import io
import pickle
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image, features

from vitreg.data.decode import REASONS, DecodeError, decode_image


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus mild noise: compresses like a photo, so JPEG artefacts stay small."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], axis=-1) * 220
    noise = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return np.clip(base + noise + 15, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def as_hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def reason_of(data: bytes, **kwargs: object) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason in REASONS
    return info.value.reason


JPEG = encode(Image.fromarray(photo(120, 160)), "JPEG", quality=90)


# ---------------------------------------------------------------- JPEG through simplejpeg
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_jpeg_pixels_equal_pil(subsampling: int) -> None:
    data = encode(Image.fromarray(photo(61, 83)), "JPEG", quality=85, subsampling=subsampling)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable NumPy arrays
        out = decode_image(data)
    assert out.dtype == torch.uint8 and out.shape == (3, 61, 83) and out.is_contiguous()
    np.testing.assert_array_equal(as_hwc(out), pil_rgb(data))
    out[0, 0, 0] = 7  # writable


def test_grayscale_jpeg_gives_three_equal_channels() -> None:
    data = encode(Image.fromarray(photo(40, 50)[..., 1]), "JPEG")
    out = decode_image(data)
    assert out.shape == (3, 40, 50) and out.is_contiguous()
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    np.testing.assert_array_equal(out[0].numpy(), np.asarray(Image.open(io.BytesIO(data))))


def test_cmyk_jpeg_pixels_equal_pil_with_and_without_draft() -> None:
    # TurboJPEG's CMYK -> RGB differs from PIL's by one level on most pixels: these go through PIL.
    data = encode(Image.fromarray(photo(96, 128)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    np.testing.assert_array_equal(as_hwc(decode_image(data)), pil_rgb(data))
    image = Image.open(io.BytesIO(data))
    image.draft(None, (64, 48))
    np.testing.assert_array_equal(as_hwc(decode_image(data, draft_side=48)), np.asarray(image.convert("RGB")))


def test_progressive_jpeg() -> None:
    data = encode(Image.fromarray(photo(90, 70)), "JPEG", progressive=True)
    np.testing.assert_array_equal(as_hwc(decode_image(data)), pil_rgb(data))
    assert decode_image(data, draft_side=20).shape == (3, 45, 35)


def test_jpeg_that_simplejpeg_refuses_falls_back_to_pil() -> None:
    # Stray bytes before a marker are a harmless libjpeg warning: strict simplejpeg raises, PIL decodes.
    dqt = JPEG.index(b"\xff\xdb")
    data = JPEG[:dqt] + b"\x00\x00\x00" + JPEG[dqt:]
    np.testing.assert_array_equal(as_hwc(decode_image(data)), pil_rgb(data))
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (80, 60))
    np.testing.assert_array_equal(as_hwc(decode_image(data, draft_side=60)), np.asarray(image))
    assert reason_of(data, draft_side=60, min_side=121) == "too_small"  # the PIL path checks sizes too


def _kinds_of_input() -> dict[str, bytes]:
    rgb = Image.fromarray(photo(45, 70))
    return {
        "jpeg": encode(rgb, "JPEG", quality=90),
        "grey jpeg": encode(rgb.convert("L"), "JPEG"),
        "cmyk jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "progressive jpeg": encode(rgb, "JPEG", progressive=True),
        "png": encode(rgb, "PNG"),
        "rgba png": encode(rgb.convert("RGBA"), "PNG"),
        "grey png": encode(rgb.convert("L"), "PNG"),
    }


@pytest.mark.parametrize("kind", list(_kinds_of_input()))
def test_channels_last_is_the_same_image_over_hwc_memory(kind: str) -> None:
    data = _kinds_of_input()[kind]
    for draft_side in (None, 20):
        plain = decode_image(data, draft_side=draft_side)
        hwc = decode_image(data, draft_side=draft_side, channels_last=True)
        assert hwc.shape == plain.shape and hwc.dtype == torch.uint8
        assert hwc.permute(1, 2, 0).is_contiguous() and torch.equal(hwc, plain)
        hwc[0, 0, 0] = 7  # writable, and the grey channels are real copies
        assert hwc[1, 0, 0] == plain[1, 0, 0]


# ---------------------------------------------------------------- JPEG draft scaling
@pytest.mark.parametrize(
    ("draft_side", "size"), [(None, (600, 800)), (224, (300, 400)), (100, (150, 200)), (1, (75, 100))]
)
def test_draft_picks_largest_power_of_two_keeping_short_side(draft_side: int | None, size: tuple[int, int]) -> None:
    data = encode(Image.fromarray(photo(600, 800)), "JPEG", quality=90)
    out = decode_image(data, draft_side=draft_side)
    assert tuple(out.shape) == (3, *size)
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (size[1], size[0]))  # libjpeg's own 1/2^k scaling, as PIL does it
    np.testing.assert_array_equal(as_hwc(out), np.asarray(image))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    resized = np.asarray(full.resize((size[1], size[0]), Image.Resampling.BOX)).astype(float)
    assert np.abs(as_hwc(out) - resized).mean() < 1.0


def test_draft_never_goes_below_draft_side_and_leaves_other_formats_alone() -> None:
    assert decode_image(JPEG, draft_side=61).shape == (3, 120, 160)  # 120 // 2 = 60 < 61
    assert decode_image(JPEG, draft_side=60).shape == (3, 60, 80)
    assert decode_image(JPEG, draft_side=1000).shape == (3, 120, 160)
    odd = encode(Image.fromarray(photo(101, 37)), "JPEG")  # scaled sizes round up, as libjpeg does
    assert decode_image(odd, draft_side=9).shape == (3, 26, 10)
    png = encode(Image.fromarray(photo(120, 160)), "PNG")
    assert decode_image(png, draft_side=30).shape == (3, 120, 160)


# ---------------------------------------------------------------- PIL formats and colour modes
@pytest.mark.parametrize(("fmt", "kwargs"), [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_round_trip(fmt: str, kwargs: dict) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("PIL built without WebP")
    pixels = photo(33, 47)
    out = decode_image(encode(Image.fromarray(pixels), fmt, **kwargs))
    assert out.is_contiguous()
    np.testing.assert_array_equal(as_hwc(out), pixels)


def test_palette_png_with_transparency_drops_alpha_without_warning() -> None:
    image = Image.new("P", (4, 3))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2, 1] * 3)
    data = encode(image, "PNG", transparency=0)  # index 0 (red) fully transparent
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_image(data)
    assert out[:, 0, 0].tolist() == [255, 0, 0]  # the colour stays; only alpha goes, as convert("RGB")
    assert out[:, 0, 1].tolist() == [0, 255, 0] and out[:, 0, 2].tolist() == [0, 0, 255]


def test_alpha_is_dropped_for_rgba_and_la() -> None:
    rgba = np.dstack([photo(10, 12), np.linspace(0, 255, 120).reshape(10, 12).astype(np.uint8)])
    np.testing.assert_array_equal(as_hwc(decode_image(encode(Image.fromarray(rgba), "PNG"))), rgba[..., :3])
    la = Image.fromarray(rgba[..., [0, 3]].copy(), mode="LA")
    out = decode_image(encode(la, "PNG"))
    assert out.shape == (3, 10, 12)
    for c in range(3):
        np.testing.assert_array_equal(out[c].numpy(), rgba[..., 0])


def test_16_bit_png_is_scaled_to_8_bit() -> None:
    values = np.array([[0, 255, 256, 1000, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert out.shape == (3, 1, 6)
    assert out[0].tolist() == [[0, 0, 1, 3, 128, 255]] and torch.equal(out[0], out[2])


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in [(200, 10, 10), (10, 200, 10), (10, 10, 200)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data)
    assert out.shape == (3, 6, 8)
    assert out[:, 3, 4].tolist() == [200, 10, 10]


# ---------------------------------------------------------------- failure reasons
def test_decode_error_is_a_picklable_value_error() -> None:
    error = DecodeError("truncated", "cut short")
    assert isinstance(error, ValueError) and error.reason == "truncated" and "cut short" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.reason == "truncated" and str(copy) == str(error)
    with pytest.raises(ValueError, match="unknown"):
        DecodeError("bad_slug", "x")


def test_empty_and_non_images() -> None:
    assert reason_of(b"") == "empty"
    noise = np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert reason_of(noise) == "not_an_image"
    assert reason_of(b"label,path\n3,images/cat.jpg\n" * 20) == "not_an_image"
    assert reason_of(b'{"cls": 3}') == "not_an_image"


@pytest.mark.parametrize("fraction", [0.6, 0.95, 0.02])  # 0.02: cut inside the header
def test_truncated_jpeg(fraction: float) -> None:
    with pytest.raises(DecodeError) as info:
        decode_image(JPEG[: int(len(JPEG) * fraction)])
    assert info.value.reason == "truncated", info.value


def test_truncated_jpeg_with_an_exif_thumbnail() -> None:
    # The thumbnail in APP1 brings its own SOS and EOI; the main image's missing EOI must still be noticed.
    payload = b"Exif\x00\x00" + encode(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG")
    data = JPEG[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + JPEG[2:]
    np.testing.assert_array_equal(as_hwc(decode_image(data)), pil_rgb(JPEG))
    assert reason_of(data[: int(len(data) * 0.7)]) == "truncated"
    assert reason_of(data[: len(payload) + 40]) == "truncated"  # cut in the main header, after the thumbnail


@pytest.mark.parametrize("fill", ["random", "zeros", "0xff"])
def test_jpeg_with_garbage_body_is_corrupt(fill: str) -> None:
    garbage = {
        "random": np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes(),
        "zeros": bytes(400),  # PIL decodes this one (a libjpeg warning), with flat grey blocks
        "0xff": b"\xff" * 400,
    }[fill]
    broken = bytearray(JPEG)
    middle = len(JPEG) // 2
    broken[middle : middle + 400] = garbage
    with pytest.raises(DecodeError) as info:
        decode_image(bytes(broken))
    assert info.value.reason == "corrupt", info.value
    assert "simplejpeg" in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_truncated_pil_formats(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("PIL built without WebP")
    data = encode(Image.fromarray(photo(64, 64)), fmt)
    assert reason_of(data[: int(len(data) * 0.6)]) == "truncated"
    assert reason_of(data[:20]) == "truncated"  # magic bytes, no complete header


def test_png_with_garbage_body_is_corrupt() -> None:
    data = bytearray(encode(Image.fromarray(photo(64, 64)), "PNG"))
    data[200:400] = np.random.default_rng(2).integers(0, 256, 200, dtype=np.uint8).tobytes()
    assert reason_of(bytes(data)) == "corrupt"


def test_too_small() -> None:
    strip = Image.fromarray(photo(5, 40))
    for fmt in ("JPEG", "PNG"):
        data = encode(strip, fmt)
        assert reason_of(data, min_side=8) == "too_small"
        assert decode_image(data, min_side=5).shape == (3, 5, 40)


def test_max_pixels() -> None:
    for data in (JPEG, encode(Image.fromarray(photo(120, 160)), "PNG")):
        assert reason_of(data, max_pixels=120 * 160 - 1) == "too_large"
        assert decode_image(data, max_pixels=120 * 160).shape == (3, 120, 160)


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (CRC fixed up) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 baseline JPEG whose SOF0 claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 120, 150)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(
    "bomb",
    [
        pytest.param(lambda: jpeg_claiming(60_000, 60_000), id="jpeg-60000^2"),  # simplejpeg header
        pytest.param(lambda: png_claiming(100_000, 100_000), id="png-100000^2"),  # PIL's own error (> 2x its limit)
        pytest.param(lambda: png_claiming(16_000, 12_000), id="png-1.07x-limit"),  # PIL only warns; our check
    ],
)
def test_decompression_bomb_is_refused_without_allocating(bomb: Callable[[], bytes]) -> None:
    data = bomb()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            assert reason_of(data) == "too_large"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 0.5
    assert peak < 4 * 2**20  # a decode would need gigabytes


def test_jpeg_bomb_decodes_once_allowed() -> None:
    # The same patched header is honoured when the limit allows it: the refusal above came from the size check.
    data = jpeg_claiming(32, 24)
    assert reason_of(data, max_pixels=32 * 24 - 1) == "too_large"
    assert reason_of(data) == "corrupt"  # the scan only covers 16x16, so libjpeg runs out of data segment


# ---------------------------------------------------------------- speed (reported, not asserted)
def test_report_decode_speed(capsys: pytest.CaptureFixture[str]) -> None:
    data = encode(Image.fromarray(photo(384, 512)), "JPEG", quality=90)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decoding is single-threaded anyway; the HWC->CHW copy might not be
    rates = {}
    for label, kwargs in [("full", {}), ("draft 1/2", {"draft_side": 192}), ("draft 1/4", {"draft_side": 96})]:
        decode_image(data, **kwargs)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.3:
            decode_image(data, **kwargs)
            n += 1
        rates[label] = n / (time.perf_counter() - start)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).contiguous()
        n += 1
    rates["PIL full"] = n / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    with capsys.disabled():
        print("\n512x384 JPEG, one thread: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()))

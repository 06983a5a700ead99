"""Data loading speed of ONE loader worker: JPEG decode + DINOv2 multi-crop, ours against a plain PIL pipeline.

Everything runs in this process on one thread (``torch.set_num_threads(1)``), which is what one
DataLoader worker does, so the img/s printed are per worker, i.e. per CPU core. A shard set of
JPEG-compressible photo-like images (SyntheticShapes upscaled plus sensor-like grain) is written
first with ``write_shards``. Then, side by side:

- ours: ``ShardStream(..., MultiCropTransform(...), draft_side=global size)`` iterated directly:
  simplejpeg decode (with libjpeg-turbo draft downscaling when the image is large enough) + the
  torch transforms;
- baseline: the same tar members read with ``tarfile``, ``PIL.Image.open(...).convert("RGB")``, and the
  DINOv2 recipe with PIL ops (``resize(box=..., BICUBIC)``, ``ImageEnhance``, HSV hue shift in numpy,
  ``ImageFilter.GaussianBlur``, ``ImageOps.solarize``), then numpy -> torch and normalisation.

Also printed: decode-only and transform-only img/s (pre-read bytes / pre-decoded images), to show
where the time goes. ``--photometric-batched`` adds the design measurement for moving the photometric
ops (jitter, grayscale, blur, solarize, normalise) after the host-to-device transfer: the worker end to
end with geometric-only uint8 crops, and, per image, geometric float vs uint8 crops and the photometric
ops per crop vs batched over stacked crops, all on this CPU (a GPU is not measured here).

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --photometric-batched
    python benchmarks/bench_data.py --images 128 --size 1024x768 --repeats 1
    python benchmarks/bench_data.py --mixed
    git archive COMMIT vitreg | tar -x -C /tmp/old && python benchmarks/bench_data.py --mixed --compare-with /tmp/old

``--mixed`` (``--set mixed``) replaces the uniform JPEGs by a fixed-seed mix written straight to tar
shards (no ``write_shards`` re-encoding): small JPEGs, progressive, grayscale and CMYK JPEGs, PNGs in
``.png`` members and large JPEGs, in the proportions of ``MIXED_KINDS``; it also prints decode + crops
img/s per kind, ours against the baseline. The end-to-end pipelines (and, per kind, decode + crops) run in
turn within each repeat; ``--compare-with`` adds another checkout's pipeline to them, for before/after.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from vitreg.data.decode import IMAGE_EXTENSIONS, decode_image
from vitreg.data.shards import write_shards
from vitreg.data.synthetic import SyntheticShapes
from vitreg.data.transforms import (
    BLUR_PROBABILITIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropTransform,
    adjust_brightness,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    normalize,
    random_gaussian_blur,
    random_horizontal_flip,
    random_resized_crop,
    rgb_to_grayscale,
    sample_crop_box,
    solarize,
)
from vitreg.data.webdataset import ShardStream

GLOBAL_SCALE, LOCAL_SCALE = (0.32, 1.0), (0.05, 0.32)
# Grey levels of sensor-like grain: per pixel, and smooth over ~3 px. Without it the upscaled renders compress
# like flat cartoons; with it a 500x375 q90 JPEG is ~75 kB (ImageNet's mean file is ~110 kB at ~400x350).
GRAIN_FINE, GRAIN_COARSE = 8.0, 16.0


# ---------------------------------------------------------------- the shard sets
def grainy_photo(shapes: SyntheticShapes, index: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a SyntheticShapes render upscaled to ``width`` x ``height``, plus grain."""
    small, _ = shapes.render(index % len(shapes))
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    coarse = rng.normal(0.0, GRAIN_COARSE, (3, height // 3 + 1, width // 3 + 1)).astype(np.float32)
    coarse = np.stack(
        [np.asarray(Image.fromarray(c).resize((width, height), Image.Resampling.BILINEAR)) for c in coarse], -1
    )
    img = np.clip(img + coarse + rng.normal(0.0, GRAIN_FINE, img.shape), 0, 255).round().astype(np.uint8)
    return Image.fromarray(img)


def make_shard_set(out: Path, images: int, width: int, height: int, quality: int) -> list[str]:
    """``images`` JPEGs of ``width`` x ``height`` written as shards under ``out``; returns the shard paths."""
    shapes = SyntheticShapes(images, image_size=max(16, min(width, height) // 2), seed=0)
    rng = np.random.default_rng(0)
    jpg_dir = Path(tempfile.mkdtemp(prefix="bench_data_jpg_"))
    try:
        paths = []
        for i in range(images):  # small renders, upscaled: cheap to generate
            path = jpg_dir / f"{i:06d}.jpg"
            grainy_photo(shapes, i, rng, width, height).save(path, quality=quality)
            paths.append(path)
        summary = write_shards(paths, out, prefix="bench", max_count=128, progress=False, overwrite=True)
    finally:
        shutil.rmtree(jpg_dir)
    return summary.shards


# The mixed set, per 20 images (kind: count, sizes, how it is saved). Sizes are drawn per image from the
# listed range (small) or cycled (the others); every JPEG is quality ``--quality``, 4:2:0 (PIL's default).
MIXED_KINDS: dict[str, tuple[int, str]] = {
    "small": (5, "160x120 .. 300x200 RGB JPEG (either orientation)"),
    "medium": (2, "500x375 RGB JPEG, baseline"),
    "progressive": (3, "500x375 / 640x480 RGB JPEG, progressive"),
    "gray": (2, "500x375 / 320x240 grayscale (L) JPEG"),
    "cmyk": (2, "500x375 / 640x480 CMYK JPEG (Adobe, inverted, as PIL writes it)"),
    "png": (3, "400x300 / 256x256 RGB PNG, stored as .png members (RGBA every third one)"),
    "large": (3, "1600x1200 / 2500x1900 / 1200x1600 RGB JPEG"),
}
_MIXED_SIZES = {
    "medium": [(500, 375)],
    "progressive": [(500, 375), (640, 480)],
    "gray": [(500, 375), (320, 240)],
    "cmyk": [(500, 375), (640, 480)],
    "png": [(400, 300), (256, 256)],
    "large": [(1600, 1200), (2500, 1900), (1200, 1600)],
}


def mixed_kinds(images: int) -> list[str]:
    """The kind of each of ``images`` samples: ``MIXED_KINDS`` proportions, shuffled with a fixed seed."""
    cycle = [kind for kind, (count, _) in MIXED_KINDS.items() for _ in range(count)]
    kinds = [cycle[i % len(cycle)] for i in range(images)]
    random.Random(0).shuffle(kinds)
    return kinds


def encode_mixed(img: Image.Image, kind: int | str, nth: int, quality: int) -> tuple[str, bytes]:
    """``(extension, bytes)`` of one mixed-set sample of ``kind`` (``nth`` of its kind)."""
    buf = io.BytesIO()
    if kind == "png":
        (img.convert("RGBA") if nth % 3 == 2 else img).save(buf, format="PNG")
        return "png", buf.getvalue()
    mode = {"gray": "L", "cmyk": "CMYK"}.get(kind, "RGB")
    img.convert(mode).save(buf, format="JPEG", quality=quality, progressive=kind == "progressive")
    return "jpg", buf.getvalue()


def make_mixed_set(out: Path, images: int, quality: int, per_shard: int = 128) -> tuple[list[str], list[str]]:
    """The mixed set written as tar shards under ``out``: ``(shard paths, kind of each sample in order)``."""
    kinds = mixed_kinds(images)
    shapes = SyntheticShapes(images, image_size=128, seed=0)
    rng, size_rng = np.random.default_rng(0), random.Random(1)
    seen: dict[str, int] = {}
    shards: list[str] = []
    for start in range(0, images, per_shard):
        path = out / f"mixed-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, images)):
                kind, nth = kinds[i], seen.get(kinds[i], 0)
                seen[kind] = nth + 1
                if kind == "small":
                    w, h = size_rng.randint(160, 300), size_rng.randint(120, 200)
                    w, h = (w, h) if size_rng.random() < 0.75 else (h, w)
                else:
                    w, h = _MIXED_SIZES[kind][nth % len(_MIXED_SIZES[kind])]
                ext, data = encode_mixed(grainy_photo(shapes, i, rng, w, h), kind, nth, quality)
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append(str(path))
    return shards, kinds


def read_images(shards: Iterable[str]) -> list[bytes]:
    """The image members of the shards, in order, read with tarfile (what the baseline reads)."""
    blobs = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            blobs.extend(tar.extractfile(m).read() for m in tar if m.isfile() and _is_image(m.name))
    return blobs


def _is_image(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------- the PIL baseline
def pil_adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """Shift hue by ``factor`` turns: H plane of PIL's HSV, shifted with uint8 wrap-around."""
    h, s, v = img.convert("HSV").split()
    shifted = np.asarray(h, dtype=np.uint8) + np.uint8(round(factor * 255) % 256)  # uint8 arrays wrap mod 256
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")


class PilMultiCrop:
    """DINOv2's multi-crop with PIL ops, per sample, as a straightforward torchvision-free PIL pipeline would do it.

    Same random law as :class:`MultiCropTransform` (crop box, flip 0.5, jitter p=0.8 in random order,
    grayscale 0.2, blur with DINOv2's effective probabilities, solarize 0.2 on the second global crop),
    drawn from Python's ``random`` (cheaper than torch's RNG, so if anything this flatters the baseline).
    """

    def __init__(self, global_size: int, local_size: int, local_number: int, seed: int = 0) -> None:
        self.global_size, self.local_size, self.local_number = global_size, local_size, local_number
        self.blur_g1, self.blur_g2, self.blur_local = BLUR_PROBABILITIES["dinov2"]
        self.rng = random.Random(seed)
        self.mean = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
        self.inv_std = 1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255)

    def box(self, width: int, height: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a RandomResizedCrop box (ratio 3/4..4/3, 10 tries, central fallback)."""
        rng, area = self.rng, width * height
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        ratio = width / height
        if ratio < 3 / 4:
            w, h = width, round(width * 4 / 3)
        elif ratio > 4 / 3:
            w, h = round(height * 4 / 3), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def jitter(self, img: Image.Image) -> Image.Image:
        rng = self.rng
        ops = [
            lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(0.6, 1.4)),
            lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(0.6, 1.4)),
            lambda x: ImageEnhance.Color(x).enhance(rng.uniform(0.8, 1.2)),
            lambda x: pil_adjust_hue(x, rng.uniform(-0.1, 0.1)),
        ]
        for i in rng.sample(range(4), 4):
            img = ops[i](img)
        return img

    def crop(
        self, img: Image.Image, size: int, scale: tuple[float, float], blur_p: float, sol_p: float
    ) -> torch.Tensor:
        rng = self.rng
        x = img.resize((size, size), Image.Resampling.BICUBIC, box=self.box(*img.size, scale))
        if rng.random() < 0.5:
            x = x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.8:
            x = self.jitter(x)
        if rng.random() < 0.2:
            x = x.convert("L").convert("RGB")
        if rng.random() < blur_p:
            x = x.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if sol_p > 0 and rng.random() < sol_p:
            x = ImageOps.solarize(x, 128)
        arr = (np.asarray(x, dtype=np.float32) - self.mean) * self.inv_std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __call__(self, img: Image.Image) -> dict[str, list[torch.Tensor]]:
        g, loc = self.global_size, self.local_size
        return {
            "global_crops": [
                self.crop(img, g, GLOBAL_SCALE, self.blur_g1, 0.0),
                self.crop(img, g, GLOBAL_SCALE, self.blur_g2, 0.2),
            ],
            "local_crops": [self.crop(img, loc, LOCAL_SCALE, self.blur_local, 0.0) for _ in range(self.local_number)],
        }


def pil_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def pil_stream(shards: Iterable[str], transform: PilMultiCrop) -> Iterable[dict[str, list[torch.Tensor]]]:
    """The baseline loader worker: tar members -> PIL decode -> PIL multi-crop."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and _is_image(member.name):
                    yield transform(pil_decode(tar.extractfile(member).read()))


# ---------------------------------------------------------------- photometric: per crop vs batched
def crop_specs(args: argparse.Namespace) -> list[tuple[int, tuple[float, float]]]:
    """``(size, scale)`` of each crop of one image: 2 global, then the local ones."""
    return [(args.global_size, GLOBAL_SCALE)] * 2 + [(args.local_size, LOCAL_SCALE)] * args.local_crops


def geometric_uint8(img: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
    """RandomResizedCrop + flip kept in uint8 (torch resamples uint8 directly: PIL-like rounding, no float pass)."""
    top, left, h, w = sample_crop_box(img.shape[-2], img.shape[-1], scale)
    crop = img[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.flip(-1) if torch.rand(1).item() < 0.5 else out


def photometric_per_crop(x: torch.Tensor, blur_p: float, sol_p: float) -> torch.Tensor:
    """The photometric tail of ``MultiCropTransform`` for one float crop in [0, 1]."""
    if torch.rand(1).item() < 0.8:
        x = color_jitter(x)
    if torch.rand(1).item() < 0.2:
        x = rgb_to_grayscale(x)
    x = random_gaussian_blur(x, blur_p)
    if sol_p > 0 and torch.rand(1).item() < sol_p:
        x = solarize(x)
    return normalize(x)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.tensor((0.299, 0.587, 0.114), dtype=x.dtype).view(3, 1, 1)).sum(dim=-3, keepdim=True)


def _batched_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return torch.lerp(_luma(x).mean(dim=(-3, -2, -1), keepdim=True), x, factor).clamp_(0.0, 1.0)


# brightness, saturation and hue broadcast over a (N, 1, 1, 1) factor as they are; contrast needs a per-image mean.
_JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness,
    _batched_contrast,
    adjust_saturation,
    adjust_hue,
)


def _batched_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    """Per-image Gaussian blur of square crops, reflect padding: ``B_i @ x_i @ B_i^T`` with a banded matrix each."""
    n, side, half = x.shape[0], x.shape[-1], kernel_size // 2
    t = torch.arange(-half, half + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernel /= kernel.sum(dim=1, keepdim=True)
    taps = (torch.arange(side)[:, None] + torch.arange(-half, half + 1)[None]).abs()
    taps = torch.where(taps > side - 1, 2 * (side - 1) - taps, taps)
    rows = torch.zeros(n, side, side, dtype=x.dtype)
    rows.scatter_add_(2, taps.expand(n, -1, -1), kernel[:, None, :].expand(n, side, -1).contiguous())
    rows = rows[:, None]
    return rows @ x @ rows.transpose(-1, -2)


def photometric_batched(crops: torch.Tensor, blur_p: torch.Tensor, sol_p: torch.Tensor) -> torch.Tensor:
    """The same ops and random law as :func:`photometric_per_crop`, on a stacked ``(N, 3, S, S)`` uint8 batch.

    Each crop keeps its own coins and factors; the per-crop random order of the jitter ops is applied by
    running, for each of the 4 positions, each op on the crops that have it at that position.
    """
    n = crops.shape[0]
    x = crops.float().div_(255.0)
    jittered = (torch.rand(n) < 0.8).nonzero().squeeze(1)
    order = torch.rand(n, 4).argsort(dim=1)
    factors = torch.stack(
        [
            torch.empty(n).uniform_(0.6, 1.4),
            torch.empty(n).uniform_(0.6, 1.4),
            torch.empty(n).uniform_(0.8, 1.2),
            torch.empty(n).uniform_(-0.1, 0.1),
        ]
    ).view(4, n, 1, 1, 1)
    for position in range(4):
        for op in range(4):
            idx = jittered[order[jittered, position] == op]
            if idx.numel():
                x[idx] = _JITTER_OPS[op](x[idx], factors[op, idx])
    gray = (torch.rand(n) < 0.2).nonzero().squeeze(1)
    if gray.numel():
        x[gray] = _luma(x[gray]).expand(-1, 3, -1, -1)
    blurred = (torch.rand(n) < blur_p).nonzero().squeeze(1)
    if blurred.numel():
        x[blurred] = _batched_blur(x[blurred], torch.empty(blurred.numel()).uniform_(0.1, 2.0))
    solarized = (torch.rand(n) < sol_p).nonzero().squeeze(1)
    if solarized.numel():
        x[solarized] = torch.where(x[solarized] >= 128 / 255, 1.0 - x[solarized], x[solarized])
    return normalize(x)


def bench_photometric(images: list[torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    """Seconds per image (median over ``args.repeats`` passes) of each stage, per sample vs the batched design.

    Per sample (as ``MultiCropTransform`` now): crop + resize + flip to float, then the photometric ops per
    crop. Batched design: crop + resize + flip kept in uint8 per sample (the worker), then stacking and
    the photometric ops over the stacked batch, one pass per crop size (CPU here, meant for the GPU).
    """
    g1, g2, loc = BLUR_PROBABILITIES["dinov2"]
    sizes = crop_specs(args)
    passes: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        totals = dict.fromkeys(
            ("geometric_float", "photometric_per_crop", "geometric_uint8", "photometric_batched"), 0.0
        )
        for start in range(0, len(images), args.batch):
            chunk = images[start : start + args.batch]
            b = len(chunk)
            t0 = time.perf_counter()
            floats = [[random_horizontal_flip(random_resized_crop(img, *sc)) for sc in sizes] for img in chunk]
            t1 = time.perf_counter()
            for crops in floats:
                for i, c in enumerate(crops):
                    photometric_per_crop(c, g1 if i == 0 else g2 if i == 1 else loc, 0.2 if i == 1 else 0.0)
            t2 = time.perf_counter()
            uint8 = [[geometric_uint8(img, *sc) for sc in sizes] for img in chunk]
            t3 = time.perf_counter()
            globals_ = torch.stack([crops[i] for i in range(2) for crops in uint8])  # [g1 of all, g2 of all]
            locals_ = torch.stack([c for crops in uint8 for c in crops[2:]])
            photometric_batched(globals_, torch.tensor([g1] * b + [g2] * b), torch.tensor([0.0] * b + [0.2] * b))
            photometric_batched(locals_, torch.full((len(locals_),), loc), torch.zeros(len(locals_)))
            t4 = time.perf_counter()
            for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                totals[key] += seconds
        for key, seconds in totals.items():
            passes.setdefault(key, []).append(seconds / len(images))
    return {key: statistics.median(values) for key, values in passes.items()}


# ---------------------------------------------------------------- timing
def rate(fn: Callable[[], int], repeats: int) -> tuple[float, float, float]:
    """(median, best, CPU-time median) items/s of ``fn`` (which returns how many items it processed) over
    ``repeats`` runs. The CPU-time rate counts only this process's CPU seconds: on a shared machine it is far
    steadier than wall time, which also counts the time other processes held the core."""
    rates, cpu_rates = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
        cpu_rates.append(n / (time.process_time() - cpu_start))
    return statistics.median(rates), max(rates), statistics.median(cpu_rates)


def interleaved(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, float, float]]:
    """``rate`` of several pipelines, one run of each in turn per repeat, so a slow spell on a shared
    machine hits them alike."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            n = fn()
            runs[name].append((n / (time.perf_counter() - start), n / (time.process_time() - cpu_start)))
    return {
        name: (statistics.median(w for w, _ in r), max(w for w, _ in r), statistics.median(c for _, c in r))
        for name, r in runs.items()
    }


def load_other_vitreg(root: Path) -> SimpleNamespace:
    """``ShardStream``, ``MultiCropTransform`` and ``decode_image`` of the vitreg checkout at ``root`` (e.g. a
    ``git archive`` of an older commit), imported beside this one: its modules are swapped into
    ``sys.modules`` only while they import, and keep their own globals afterwards."""
    mine = {name: mod for name, mod in sys.modules.items() if name == "vitreg" or name.startswith("vitreg.")}
    for name in mine:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        webdataset = importlib.import_module("vitreg.data.webdataset")
        transforms = importlib.import_module("vitreg.data.transforms")
        decode = importlib.import_module("vitreg.data.decode")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "vitreg" or n.startswith("vitreg.")]:
            del sys.modules[name]
        sys.modules.update(mine)
    if not Path(decode.__file__).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"--compare-with {root}: imported {decode.__file__} instead; is vitreg/ under it?")
    return SimpleNamespace(
        ShardStream=webdataset.ShardStream,
        MultiCropTransform=transforms.MultiCropTransform,
        decode_image=decode.decode_image,
    )


def consume(iterable: Iterable) -> int:
    return sum(1 for _ in iterable)


def decode_ours(data: bytes, draft: int, decode: Callable[..., torch.Tensor] = decode_image) -> torch.Tensor:
    """``decode_image`` as ``ShardStream`` calls it for ``MultiCropTransform`` (HWC memory where supported)."""
    try:
        return decode(data, draft_side=draft, channels_last=True)
    except TypeError:  # a vitreg from before channels_last (--compare-with)
        return decode(data, draft_side=draft)


def print_per_kind(
    blobs: list[bytes], kinds: list[str], pipelines: dict[str, Callable[[bytes], object]], repeats: int
) -> None:
    """img/s of decode + multi-crop per image kind of the mixed set (bytes in memory), the pipelines run in
    turn; ratios against the first (the PIL baseline), and of ours against a compared checkout."""
    names = list(pipelines)
    header = "".join(f" {n:>8s}" for n in names) + "".join(f" {n + '/PIL':>10s}" for n in names[1:])
    print(f"\n{'per kind: decode + crops, img/s':30s}{header} {'CPU ratios':>10s}")
    for kind in MIXED_KINDS:
        mine = [b for b, k in zip(blobs, kinds, strict=True) if k == kind]
        if not mine:
            continue
        fns = {n: (lambda fn=fn: consume(fn(b) for b in mine)) for n, fn in pipelines.items()}  # noqa: B023
        rates = interleaved(fns, repeats)
        wall = "".join(f" {rates[n][0]:8.1f}" for n in names)
        ratios = "".join(f" {rates[n][0] / rates[names[0]][0]:9.2f}x" for n in names[1:])
        cpu = " ".join(f"{rates[n][2] / rates[names[0]][2]:.2f}x" for n in names[1:])
        print(f"{kind + f' ({len(mine)})':30s}{wall}{ratios}  {cpu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="generated JPEGs (512 takes ~3 min on 2 cores)")
    parser.add_argument("--set", choices=("uniform", "mixed"), default="uniform", help="uniform JPEGs or the mixed set")
    parser.add_argument("--mixed", action="store_const", const="mixed", dest="set", help="same as --set mixed")
    parser.add_argument("--size", default="500x375", help="WxH of the generated JPEGs (uniform set)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated images")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--out", type=Path, default=None, help="shard folder (default: a temporary one)")
    parser.add_argument("--photometric-batched", action="store_true", help="also measure batched photometric ops")
    parser.add_argument("--batch", type=int, default=64, help="images per batch for --photometric-batched")
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        help="root of another vitreg checkout (e.g. git archive of an older commit): its ShardStream runs too, in turn",
    )
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    torch.set_num_threads(1)
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="bench_data_")
    out = args.out or Path(tmp.name)
    try:
        t0 = time.perf_counter()
        if args.set == "mixed":
            shards, kinds = make_mixed_set(out, args.images, args.quality)
            what = f"mixed set ({', '.join(f'{k} {kinds.count(k)}' for k in MIXED_KINDS)}), JPEG q{args.quality}"
        else:
            shards = make_shard_set(out, args.images, width, height, args.quality)
            kinds, what = [], f"JPEGs {width}x{height} q{args.quality}"
        blobs = read_images(shards)
        print(
            f"torch={torch.__version__} threads={torch.get_num_threads()} Pillow={PIL.__version__} "
            f"simplejpeg={simplejpeg.__version__} numpy={np.__version__} load average={os.getloadavg()[0]:.2f}\n"
            f"{len(blobs)} images, {what}, in {len(shards)} shards, "
            f"mean {np.mean([len(b) for b in blobs]) / 1e3:.1f} kB (generated in {time.perf_counter() - t0:.0f} s); "
            f"crops 2x{args.global_size} + {args.local_crops}x{args.local_size}, repeats={args.repeats} (median, best)"
        )
        ours = MultiCropTransform(
            global_crops_size=args.global_size, local_crops_size=args.local_size, local_crops_number=args.local_crops
        )
        baseline = PilMultiCrop(args.global_size, args.local_size, args.local_crops)
        draft = args.global_size

        def ours_pipeline() -> int:
            stream = ShardStream(shards, ours, resampled=False, shuffle_buffer=1, draft_side=draft, rank_world=(0, 1))
            return consume(stream)

        other = load_other_vitreg(args.compare_with) if args.compare_with else None
        if other is not None:
            theirs = other.MultiCropTransform(
                global_crops_size=args.global_size,
                local_crops_size=args.local_size,
                local_crops_number=args.local_crops,
            )

            def other_pipeline() -> int:
                kwargs = {"resampled": False, "shuffle_buffer": 1, "draft_side": draft, "rank_world": (0, 1)}
                return consume(other.ShardStream(shards, theirs, **kwargs))

        sizes = crop_specs(args)

        def geometric_worker() -> int:  # the worker if the photometric ops moved after the transfer
            stream = ShardStream(
                shards,
                lambda img: [geometric_uint8(img, *sc) for sc in sizes],
                resampled=False,
                shuffle_buffer=1,
                draft_side=draft,
                rank_world=(0, 1),
            )
            return consume(stream)

        torch.manual_seed(0)
        rows: list[tuple[str, float, float, float]] = []
        decoded = [decode_ours(b, draft) for b in blobs]
        pil_images = [pil_decode(b) for b in blobs]
        for name, fn in (
            ("decode  PIL open+convert(RGB)", lambda: consume(pil_decode(b) for b in blobs)),
            ("decode  decode_image(draft_side)", lambda: consume(decode_ours(b, draft) for b in blobs)),
            ("decode  decode_image(no draft)", lambda: consume(decode_image(b) for b in blobs)),
            ("crops   PIL baseline", lambda: consume(baseline(img) for img in pil_images)),
            ("crops   MultiCropTransform", lambda: consume(ours(img) for img in decoded)),
            *([("total   ours, geometric only (uint8)", geometric_worker)] if args.photometric_batched else []),
        ):
            rows.append((name, *rate(fn, args.repeats)))
        totals = {"total   PIL baseline (tar->crops)": lambda: consume(pil_stream(shards, baseline))}
        totals["total   ours: ShardStream"] = ours_pipeline
        if other is not None:
            totals["total   compared: ShardStream"] = other_pipeline
        rows += [(name, *r) for name, r in interleaved(totals, args.repeats).items()]
        print(f"\n{'per worker, 1 thread':36s} {'img/s':>8s} {'best':>8s} {'ms/img':>8s} {'CPU img/s':>10s}")
        for name, median, best, cpu in rows:
            print(f"{name:36s} {median:8.1f} {best:8.1f} {1e3 / median:8.2f} {cpu:10.1f}")
        for clock, column in (("wall", 1), ("CPU time", 3)):
            speed = {row[0]: row[column] for row in rows}
            print(
                f"{'' if column == 3 else chr(10)}ours / baseline ({clock}): "
                f"total {speed['total   ours: ShardStream'] / speed['total   PIL baseline (tar->crops)']:.2f}x, "
                f"decode {speed['decode  decode_image(draft_side)'] / speed['decode  PIL open+convert(RGB)']:.2f}x, "
                f"crops {speed['crops   MultiCropTransform'] / speed['crops   PIL baseline']:.2f}x"
                + (
                    f"; ours / compared total {speed['total   ours: ShardStream'] / speed['total   compared: ShardStream']:.2f}x"
                    if other is not None
                    else ""
                )
            )

        if kinds:
            pipelines = {"PIL": lambda b: baseline(pil_decode(b)), "ours": lambda b: ours(decode_ours(b, draft))}
            if other is not None:
                pipelines["compared"] = lambda b: theirs(decode_ours(b, draft, other.decode_image))
            print_per_kind(blobs, kinds, pipelines, args.repeats)

        if args.photometric_batched:
            sec = bench_photometric(decoded, args)
            now = sec["geometric_float"] + sec["photometric_per_crop"]
            print(
                f"\nphotometric = jitter, grayscale, blur, solarize, normalise; ms per image "
                f"(2x{args.global_size} + {args.local_crops}x{args.local_size} crops), batch {args.batch}, CPU 1 thread:\n"
                f"  per sample (now):  geometric, float out      {sec['geometric_float'] * 1e3:7.2f}\n"
                f"                     photometric per crop      {sec['photometric_per_crop'] * 1e3:7.2f}\n"
                f"  batched design:    geometric, uint8 out      {sec['geometric_uint8'] * 1e3:7.2f}   (the worker)\n"
                f"                     stack + photometric batch {sec['photometric_batched'] * 1e3:7.2f}   "
                f"(per crop / batched: {sec['photometric_per_crop'] / sec['photometric_batched']:.2f}x)\n"
                f"  worker transform time, batched design / now: {sec['geometric_uint8'] / now:.2f}"
            )
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()

"""DINOv2's image transforms, reimplemented with plain torch ops on uint8 CHW tensors: the multi-crop
augmentation of pretraining, and at the end the transforms of evaluation and of the probe images.

DINOv2 runs torchvision on PIL images. Here the crop is resampled in uint8 (rounded like PIL's resize)
and turned into a float CHW tensor in [0, 1] on which every later op works, so no torchvision and no
per-op uint8 round trips are needed. The random decisions follow torchvision's (same distributions, same
order per crop, though not the same RNG stream); pixel values differ from the PIL path only by its
uint8 rounding between the later ops.

Randomness comes from ``generator`` when given, else torch's global RNG. In a DataLoader every worker
seeds torch's global RNG differently (``base_seed + worker_id``), so workers draw different crops and a
run is reproducible under ``torch.manual_seed``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as PIL's ``convert("L")`` (DINOv2 feeds PIL images to torchvision).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Probability of blurring (global crop 1, global crop 2, local crops). DINOv2's ``GaussianBlur`` passes
# ``1 - p`` to ``RandomApply`` as its *apply* probability, so what it actually trains with ("dinov2") is
# the complement of what its config says ("intended") for the global crops. Released checkpoints use "dinov2".
BLUR_PROBABILITIES = {"dinov2": (0.0, 0.9, 0.5), "intended": (1.0, 0.1, 0.5)}


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _coin(p: float, generator: torch.Generator | None) -> bool:
    """True with probability ``p``; always draws, as torchvision's ``torch.rand(1) < p`` checks do."""
    return torch.rand(1, generator=generator).item() < p


# ---------------------------------------------------------------- geometry
def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a RandomResizedCrop box, with torchvision's ``get_params`` semantics.

    Up to 10 attempts draw an area fraction uniformly in ``scale`` and a log-uniform aspect ratio (w/h)
    in ``ratio``; the first box that fits is placed uniformly. Otherwise: the largest central crop whose
    aspect ratio is clamped to ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(img: Tensor, size: int) -> Tensor:
    """Bicubic resize of a CHW image to ``(size, size)``, returned as contiguous float in [0, 1].

    ``antialias=True`` makes torch use PIL's filter (Keys a = -0.5, support widened when downsampling),
    i.e. the same kernel as DINOv2's PIL ``BICUBIC``. A uint8 image is resampled in uint8 channels_last
    (torch's fixed-point path, several times faster than float), so the result is rounded to uint8 like
    PIL's before it becomes float; a float image is resampled in float. Cubic overshoot is clamped away
    (uint8 saturates). Pass a CHW view of HWC memory (``hwc.permute(2, 0, 1)``) to skip a layout copy.
    """
    if img.dtype == torch.uint8:
        return _to_float(_resize_uint8(img, size))
    out = F.interpolate(img[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 1.0)


def _resize_uint8(img: Tensor, size: int) -> Tensor:
    """uint8 ``(C, size, size)`` antialiased bicubic resize (channels_last memory) of a uint8 CHW image."""
    x = img[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]


def _to_float(img: Tensor) -> Tensor:
    """uint8 CHW (any memory layout) -> contiguous float32 in [0, 1], in one allocation."""
    return torch.empty(img.shape, dtype=torch.float32).copy_(img).div_(255.0)


def random_resized_crop(
    img: Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """RandomResizedCrop of a CHW image (uint8 in [0, 255] or float in [0, 1]) to float ``(C, size, size)`` in [0, 1].

    The box comes from :func:`sample_crop_box`, the resampling from :func:`resize`.
    """
    top, left, h, w = sample_crop_box(img.shape[-2], img.shape[-1], scale, ratio, generator)
    return resize(img[..., top : top + h, left : left + w], size)


def random_horizontal_flip(img: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    return img.flip(-1) if _coin(p, generator) else img


# ---------------------------------------------------------------- colour (float CHW in [0, 1])
def _luma(img: Tensor) -> Tensor:
    """``(..., 1, H, W)`` luma plane (plane by plane: no image-sized temporary)."""
    wr, wg, wb = LUMA_WEIGHTS
    luma = img[..., 0:1, :, :] * wr
    return luma.add_(img[..., 1:2, :, :], alpha=wg).add_(img[..., 2:3, :, :], alpha=wb)


# Every colour op takes ``out=``: a new tensor by default, or ``out=img`` to work in place (what
# MultiCropTransform does on the crops it owns: on CPU, allocating fresh image-sized buffers costs as
# much as the arithmetic).
def rgb_to_grayscale(img: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Luma replicated on 3 channels."""
    luma = _luma(img)
    return luma.expand_as(img).contiguous() if out is None else out.copy_(luma.expand_as(img))


def _blend(img: Tensor, other: Tensor, factor: float, out: Tensor | None) -> Tensor:
    # lerp is exact at factor 1 (returns img), so a neutral factor is a true no-op.
    return torch.lerp(other, img, factor, out=out).clamp_(0.0, 1.0)


def adjust_brightness(img: Tensor, factor: float, *, out: Tensor | None = None) -> Tensor:
    return torch.mul(img, factor, out=out).clamp_(0.0, 1.0)


def adjust_contrast(img: Tensor, factor: float, *, out: Tensor | None = None) -> Tensor:
    """Blend towards the mean luma of the image."""
    return _blend(img, _luma(img).mean(), factor, out)


def adjust_saturation(img: Tensor, factor: float, *, out: Tensor | None = None) -> Tensor:
    """Blend towards the image's own grayscale."""
    return _blend(img, _luma(img), factor, out)


def adjust_hue(img: Tensor, factor: float, *, out: Tensor | None = None) -> Tensor:
    """Rotate hue by ``factor`` turns (``factor`` in [-0.5, 0.5]), keeping HSV saturation and value.

    Fused RGB -> HSV -> RGB: with ``v = max``, ``c = max - min`` and the rotated hue ``h`` in sixths of
    a turn (in [0, 6)), colorsys' ``hsv_to_rgb`` gives each channel as ``v - c·clamp(2 - d, 0, 1)``, ``d``
    the circular distance (period 6) from ``h`` to the channel's centre 3, 5, 1 for r, g, b (since
    ``v·s = c``, saturation is never materialised). Grey pixels have ``c = 0`` and stay unchanged.
    """
    r, g, b = img[..., 0:1, :, :], img[..., 1:2, :, :], img[..., 2:3, :, :]
    # Temporaries live in a few buffers reused through out= and in-place ops: at 224 px a fresh plane is
    # 200 kB, which glibc serves with mmap and page faults, doubling the cost. The arithmetic per element
    # is unchanged (tests/data/test_transforms.py checks it bit for bit against the plain version).
    # Plane-wise max/min: far cheaper on CPU than a channel reduction (aminmax over dim -3).
    maxc = torch.maximum(r, g)
    maxc = torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    chroma = torch.sub(maxc, torch.minimum(chroma, b, out=chroma), out=chroma)
    # Where all channels are equal the numerators are 0 too; the clamp only avoids 0 / 0.
    inv_chroma = chroma.clamp(min=1e-12).reciprocal_()
    work = torch.empty_like(img)  # three scratch planes now, the ramp of all channels below
    is_r, is_g, other = work[..., 0:1, :, :], work[..., 1:2, :, :], work[..., 2:3, :, :]
    # Hue sector from the max channel; ties resolve r, then g, then b (as torchvision). The 0/1 masks are
    # x >= max (i.e. x == max) written as float, and the selection is lerp, exact at weights 0 and 1: both
    # far cheaper on CPU than bool masks and torch.where.
    torch.ge(r, maxc, out=is_r)
    torch.ge(g, maxc, out=is_g)
    hue6 = torch.sub(r, g).add_(chroma, alpha=4)
    hue6 = torch.lerp(hue6, torch.sub(b, r, out=other).add_(chroma, alpha=2), is_g, out=hue6)
    hue6 = torch.lerp(hue6, torch.sub(g, b, out=other), is_r, out=hue6)
    # Rotate and wrap to [0, 6) on one plane; floor's rounding can leave h a hair outside, which the
    # circular distance below absorbs.
    hue6 = hue6.mul_(inv_chroma).add_(6.0 * factor)
    hue6 = hue6.sub_(torch.mul(hue6, 1.0 / 6.0, out=inv_chroma).floor_().mul_(6.0))
    # All three channels at once against a full plane of each channel's centre (3, 5, 1 for r, g, b):
    # broadcasting a (3, 1, 1) tensor instead hits a slow CPU path, and one op per plane costs 3 dispatches.
    # Everything below reads only maxc, chroma and hue6, so out may be img itself.
    out = torch.empty_like(img) if out is None else out
    dist = torch.sub(hue6.expand_as(out), _hue_centres(*img.shape[-2:], img.dtype), out=out).abs_()
    ramp = torch.neg(dist, out=work).add_(2.0)  # 2 - d, rounded as 2.0 - d
    ramp = torch.maximum(ramp, dist.sub_(4.0), out=ramp).clamp_(0.0, 1.0)  # 2 - min(d, 6 - d)
    return torch.addcmul(maxc.expand_as(out), chroma.expand_as(out), ramp, value=-1.0, out=out)


@functools.lru_cache(maxsize=8)
def _hue_centres(height: int, width: int, dtype: torch.dtype) -> Tensor:
    """``(3, height, width)`` planes of 3, 5 and 1: each channel's centre on the hue circle, in sixths."""
    return torch.tensor((3.0, 5.0, 1.0), dtype=dtype).view(3, 1, 1).expand(3, height, width).contiguous()


def color_jitter(
    img: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    inplace: bool = False,
    grey: bool = False,
) -> Tensor:
    """torchvision ``ColorJitter``: a random order of the four ops, factors drawn once per call.

    ``inplace=True`` overwrites ``img`` (no new image-sized buffers) and returns it. ``grey=True`` says
    every pixel of ``img`` has equal channels: the hue rotation, exactly the identity there (chroma 0), is
    skipped (its factor is still drawn; the other ops keep the channels equal).
    """
    order = torch.randperm(4, generator=generator).tolist()
    factors = (
        _uniform(max(0.0, 1 - brightness), 1 + brightness, generator),
        _uniform(max(0.0, 1 - contrast), 1 + contrast, generator),
        _uniform(max(0.0, 1 - saturation), 1 + saturation, generator),
        _uniform(-hue, hue, generator),
    )
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for i in order:
        if not (grey and i == 3):
            img = ops[i](img, factors[i], out=img if inplace else None)
    return img


def solarize(img: Tensor, threshold: float = 128 / 255) -> Tensor:
    """Invert pixels at or above ``threshold`` (128 of 255 by default, as DINOv2 on uint8 PIL images)."""
    # 1 where img >= threshold, else 0, without a bool mask (torch.where on CPU is several times slower).
    # x - t is exactly 0 only at x == t and has x's ordering, so sign + 1 is 0, 1 or 2 for <, ==, >.
    invert = (img - threshold).sign_().add_(1.0).clamp_(0.0, 0.5).mul_(2.0)
    # lerp is exact at weights 0 and 1: returns img or 1 - img.
    return torch.lerp(img, 1.0 - img, invert)


# ---------------------------------------------------------------- blur and normalisation
def gaussian_kernel1d(kernel_size: int, sigma: float) -> Tensor:
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(img: Tensor, kernel_size: int, sigma: float, *, out: Tensor | None = None) -> Tensor:
    """Separable Gaussian blur of a float CHW image with reflect padding (torchvision's ``gaussian_blur``).

    Each 1-D pass is ``kernel_size`` scaled shifted views of the reflect-padded image accumulated in
    place: on one CPU thread several times cheaper than torch's depthwise ``conv2d`` and, at 224 px, than
    a banded-matrix matmul (whose cost grows with side³). ``out`` may be ``img`` itself.
    """
    height, width = img.shape[-2:]
    if kernel_size % 2 != 1 or kernel_size // 2 >= min(height, width):
        raise ValueError(f"kernel_size must be odd and its half smaller than the image, got {kernel_size}")
    weights = gaussian_kernel1d(kernel_size, sigma).tolist()
    pad = kernel_size // 2
    padded = F.pad(img.reshape(1, -1, height, width), (pad,) * 4, mode="reflect")
    padded = padded.reshape(*img.shape[:-2], height + 2 * pad, width + 2 * pad)
    rows = padded[..., :, 0:width] * weights[0]
    for i in range(1, kernel_size):
        rows.add_(padded[..., :, i : i + width], alpha=weights[i])
    out = torch.mul(rows[..., 0:height, :], weights[0], out=out)
    for i in range(1, kernel_size):
        out.add_(rows[..., i : i + height, :], alpha=weights[i])
    return out


def random_gaussian_blur(
    img: Tensor,
    p: float,
    kernel_size: int = 9,
    sigma: tuple[float, float] = (0.1, 2.0),
    generator: torch.Generator | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Blur with probability ``p`` (the real apply probability) and sigma uniform in ``sigma``.

    The result goes to ``out`` (which may be ``img``) when given; unblurred, ``img`` itself is returned.
    """
    if not _coin(p, generator):
        return img
    return gaussian_blur(img, kernel_size, _uniform(sigma[0], sigma[1], generator), out=out)


def to_uint8(img: Tensor) -> Tensor:
    """float CHW in [0, 1] -> uint8, rounded to the nearest level (``_to_float``'s inverse on uint8 input)."""
    return img.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


class DeviceNormalize(torch.nn.Module):
    """uint8 crops -> float32 ``(x / 255 - mean) / std`` on their device, as ``normalize`` computes it on the
    host. Crops travel from the loader workers to the GPU as uint8 (4x fewer bytes than float32); the mean
    and 1/std live in non-persistent buffers, so they move with the module and stay out of checkpoints."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        mean_t, inv_std = _mean_and_inv_std(tuple(mean), tuple(std), torch.float32)  # normalize's constants
        self.register_buffer("mean", mean_t.clone(), persistent=False)  # clones: .to(device) must not move the cache
        self.register_buffer("inv_std", inv_std.clone(), persistent=False)

    def forward(self, crops: Tensor) -> Tensor:
        if crops.dtype != torch.uint8:
            return crops  # already normalised on the host
        return crops.float().div_(255.0).sub_(self.mean).mul_(self.inv_std)


def normalize(
    img: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """``(img - mean) / std`` per channel (into ``out``, which may be ``img``, when given)."""
    mean_t, inv_std = _mean_and_inv_std(tuple(mean), tuple(std), img.dtype)
    return torch.sub(img, mean_t, out=out).mul_(inv_std)


@functools.lru_cache(maxsize=8)
def _mean_and_inv_std(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(C, 1, 1)`` mean and 1 / std, made once: building them per crop cost ~2% of the multi-crop."""
    return torch.tensor(mean, dtype=dtype).view(-1, 1, 1), 1.0 / torch.tensor(std, dtype=dtype).view(-1, 1, 1)


# ---------------------------------------------------------------- DINOv2 multi-crop
def is_grey(img: Tensor) -> bool:
    """Whether all channels of a CHW image are equal (a colour image answers after a few pixels)."""
    return all(torch.equal(img[0], img[c]) for c in range(1, img.shape[0]))


class MultiCropTransform:
    """DINOv2's ``DataAugmentationDINO``: 2 global and ``local_crops_number`` local crops of one image.

    Per crop: RandomResizedCrop (bicubic) + hflip 0.5, colour jitter with p=0.8 (brightness 0.4,
    contrast 0.4, saturation 0.2, hue 0.1), grayscale p=0.2, Gaussian blur (kernel 9, sigma in
    [0.1, 2.0]) with the crop's blur probability, solarize (p=``solarize_prob``) on the second global
    crop only, ImageNet normalisation. ``blur_probabilities`` selects the (global1, global2, local)
    blur probabilities: ``"dinov2"`` = (0.0, 0.9, 0.5), what DINOv2 effectively trains with because of
    its inverted-probability bug, or ``"intended"`` = (1.0, 0.1, 0.5), the values written in its code;
    or any three probabilities.

    ``__call__(uint8 (3, H, W)) -> {"global_crops": [g1, g2], "local_crops": [l1, ...]}`` of float32
    normalised CHW tensors, or with ``output_dtype=torch.uint8`` of the un-normalised crops rounded to uint8
    (as DINOv2's PIL pipeline holds them before ``ToTensor``), for ``DeviceNormalize`` on the GPU. Random draws use torch's global RNG unless a ``generator`` is passed (see the
    module docstring for how DataLoader workers are seeded).
    """

    # It makes an HWC copy of a uint8 image before cropping, so a (3, H, W) view of HWC memory (what
    # ``decode_image(channels_last=True)`` returns; ShardStream asks for it) saves two image copies.
    accepts_channels_last = True

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        local_crops_number: int = 8,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        blur_probabilities: str | Sequence[float] = "dinov2",
        solarize_prob: float = 0.2,
        output_dtype: torch.dtype = torch.float32,
    ) -> None:
        if output_dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"output_dtype must be torch.float32 or torch.uint8, got {output_dtype}")
        self.output_dtype = output_dtype
        if isinstance(blur_probabilities, str):
            if blur_probabilities not in BLUR_PROBABILITIES:
                raise ValueError(
                    f"blur_probabilities must be one of {sorted(BLUR_PROBABILITIES)} or (global1, global2, local) "
                    f"probabilities, got {blur_probabilities!r}"
                )
            probs = BLUR_PROBABILITIES[blur_probabilities]
        else:
            probs = tuple(float(p) for p in blur_probabilities)
            if len(probs) != 3 or not all(0.0 <= p <= 1.0 for p in probs):
                raise ValueError(f"blur_probabilities must be 3 probabilities (global1, global2, local), got {probs}")
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.local_crops_number = local_crops_number
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.blur_probabilities = blur_probabilities
        self.global1_blur_prob, self.global2_blur_prob, self.local_blur_prob = probs
        self.solarize_prob = solarize_prob

    def _crop(
        self,
        img: Tensor,
        size: int,
        scale: tuple[float, float],
        blur_prob: float,
        solarize_prob: float,
        generator: torch.Generator | None,
        grey: bool = False,
    ) -> Tensor:
        if img.dtype == torch.uint8:
            # random_resized_crop + random_horizontal_flip with the same draws in the same order, but
            # flipping the (4x smaller) uint8 crop before its single conversion to float.
            top, left, h, w = sample_crop_box(img.shape[-2], img.shape[-1], scale, generator=generator)
            x = _resize_uint8(img[..., top : top + h, left : left + w], size)
            x = _to_float(random_horizontal_flip(x, generator=generator))
        else:
            x = random_resized_crop(img, size, scale, generator=generator)
            x = random_horizontal_flip(x, generator=generator).contiguous()
        # x is this crop's own buffer from here on, so the colour ops and normalize overwrite it.
        if _coin(0.8, generator):
            x = color_jitter(x, generator=generator, inplace=True, grey=grey)
        if _coin(0.2, generator):
            x = rgb_to_grayscale(x, out=x)
        x = random_gaussian_blur(x, blur_prob, generator=generator, out=x)
        if solarize_prob > 0 and _coin(solarize_prob, generator):
            x = solarize(x)
        return to_uint8(x) if self.output_dtype == torch.uint8 else normalize(x, out=x)

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> dict[str, list[Tensor]]:
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(img.shape)}")
        if img.dtype == torch.uint8:
            # One HWC copy up front, so each crop reaches resize's uint8 channels_last path without its own.
            img = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        # The resize treats channels alike, so every crop of a grey image is grey too: its hue rotation is skipped.
        grey = is_grey(img)
        g, gs = self.global_crops_size, self.global_crops_scale
        global_crops = [
            self._crop(img, g, gs, self.global1_blur_prob, 0.0, generator, grey),
            self._crop(img, g, gs, self.global2_blur_prob, self.solarize_prob, generator, grey),
        ]
        local_crops = [
            self._crop(img, self.local_crops_size, self.local_crops_scale, self.local_blur_prob, 0.0, generator, grey)
            for _ in range(self.local_crops_number)
        ]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global={self.global_crops_size}px {self.global_crops_scale}, "
            f"local={self.local_crops_number}x{self.local_crops_size}px {self.local_crops_scale}, "
            f"blur={self.blur_probabilities}, solarize_prob={self.solarize_prob}, output={self.output_dtype})"
        )


def accepts_generator(transform: Callable[..., object] | None) -> bool:
    """Whether ``transform`` takes a ``generator=`` (random transforms do: their readers seed one per sample)."""
    if transform is None:
        return False
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- evaluation and probe images
# Three ways to make a fixed-size input from an image, each on purpose:
# - ``ClassificationEvalTransform``: DINOv2's evaluation (shorter side to 256/224 x, centre crop);
# - ``ResizeNormalize``: the whole image squeezed to a square, no crop (inputs already square: the
#   synthetic images of the online kNN probe, the stored probe images);
# - ``center_square``: the probe images' storage (largest centred square, floor offsets, kept as uint8).
RESIZE_RATIO = 256 / 224  # DINOv2 evaluates at 224 px after resizing the shorter side to 256


def resize_shorter(img: Tensor, size: int) -> Tensor:
    """Shorter side to ``size`` (the longer scaled and truncated, as torchvision's ``Resize(int)``), bicubic
    antialiased like PIL's; float result in [0, 1]. uint8 input is resampled in uint8, rounding like PIL."""
    height, width = img.shape[-2:]
    out_hw = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    if img.dtype == torch.uint8:
        x = img[None].contiguous(memory_format=torch.channels_last)
        out = F.interpolate(x, size=out_hw, mode="bicubic", antialias=True, align_corners=False)[0]
        return out.float().div_(255.0)
    out = F.interpolate(img[None].float(), size=out_hw, mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 1.0)


def center_crop(img: Tensor, size: int) -> Tensor:
    """torchvision's ``CenterCrop`` offsets: ``int(round((side - size) / 2))`` (images are never smaller here)."""
    height, width = img.shape[-2:]
    top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    return img[..., top : top + size, left : left + size].contiguous()


class ClassificationEvalTransform:
    """DINOv2's ``make_classification_eval_transform``: shorter side to ``resize_size`` (bicubic,
    antialiased), centre crop ``resolution``, ImageNet normalisation. uint8 ``(3, H, W)`` in, float out."""

    def __init__(self, resolution: int = 224, resize_size: int | None = None) -> None:
        self.resolution = resolution
        self.resize_size = resize_size or round(resolution * RESIZE_RATIO)
        if self.resize_size < resolution:
            raise ValueError(f"resize_size {self.resize_size} is smaller than the crop {resolution}")

    def __call__(self, img: Tensor) -> Tensor:
        return normalize(center_crop(resize_shorter(img, self.resize_size), self.resolution))


class ClassificationTrainTransform:
    """DINOv2's ``make_classification_train_transform`` (linear-probe training): RandomResizedCrop
    (bicubic, scale (0.08, 1), ratio (3/4, 4/3)), horizontal flip with p=0.5, ImageNet normalisation.
    Random draws come from ``generator`` (torch's global RNG when None)."""

    def __init__(
        self,
        resolution: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
    ) -> None:
        self.resolution = resolution
        self.scale = scale
        self.ratio = ratio
        self.hflip_prob = hflip_prob

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        crop = random_resized_crop(img, self.resolution, self.scale, self.ratio, generator)
        if self.hflip_prob > 0:
            crop = random_horizontal_flip(crop, self.hflip_prob, generator)
        return normalize(crop)


def eval_transform(resolution: int = 224) -> ClassificationEvalTransform:
    """Resize the shorter side to ``round(resolution * 256 / 224)``, centre crop, normalise."""
    return ClassificationEvalTransform(resolution)


def train_transform(resolution: int = 224) -> ClassificationTrainTransform:
    """RandomResizedCrop + horizontal flip + normalise, drawing from the generator it is given."""
    return ClassificationTrainTransform(resolution)


class ResizeNormalize:
    """uint8 image -> the whole image resized to ``size`` x ``size`` (bicubic, antialiased, no crop) and
    normalised."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Tensor) -> Tensor:
        return normalize(resize(img, self.size))


def center_square(img: Tensor, size: int) -> Tensor:
    """Centre square crop of a (3, H, W) uint8 image, resized to (3, size, size) uint8."""
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[:, top : top + side, left : left + side]
    return (resize(crop.contiguous(), size) * 255).round().to(torch.uint8)

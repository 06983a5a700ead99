"""DINOv2's multi-crop augmentation, reimplemented with plain torch ops on uint8 CHW tensors.

DINOv2 runs torchvision on PIL images. Here every op works on a float CHW tensor in [0, 1] (the crop
step turns the uint8 input into one), so no torchvision and no per-op uint8 round trips are needed.
The random decisions follow torchvision's (same distributions, same order per crop, though not the
same RNG stream); pixel values differ from the PIL path only by its uint8 rounding between ops.

Randomness comes from ``generator`` when given, else torch's global RNG. In a DataLoader every worker
seeds torch's global RNG differently (``base_seed + worker_id``), so workers draw different crops and a
run is reproducible under ``torch.manual_seed``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

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
    """Bicubic resize of a CHW image to ``(size, size)``, returned as float in [0, 1].

    ``antialias=True`` makes torch use PIL's filter (Keys a = -0.5, support widened when downsampling),
    i.e. the same kernel as DINOv2's PIL ``BICUBIC``. Cubic overshoot is clamped away.
    """
    out = F.interpolate(img[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 255.0).div_(255.0) if img.dtype == torch.uint8 else out[0].clamp_(0.0, 1.0)


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
    """``(..., 1, H, W)`` luma plane."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=img.dtype).view(3, 1, 1)
    return (img * weights).sum(dim=-3, keepdim=True)


def rgb_to_grayscale(img: Tensor) -> Tensor:
    """Luma replicated on 3 channels."""
    return _luma(img).expand_as(img).contiguous()


def _blend(img: Tensor, other: Tensor, factor: float) -> Tensor:
    # lerp is exact at factor 1 (returns img), so a neutral factor is a true no-op.
    return torch.lerp(other, img, factor).clamp_(0.0, 1.0)


def adjust_brightness(img: Tensor, factor: float) -> Tensor:
    return (img * factor).clamp_(0.0, 1.0)


def adjust_contrast(img: Tensor, factor: float) -> Tensor:
    """Blend towards the mean luma of the image."""
    return _blend(img, _luma(img).mean(), factor)


def adjust_saturation(img: Tensor, factor: float) -> Tensor:
    """Blend towards the image's own grayscale."""
    return _blend(img, _luma(img), factor)


def adjust_hue(img: Tensor, factor: float) -> Tensor:
    """Rotate hue by ``factor`` turns (``factor`` in [-0.5, 0.5]), keeping HSV saturation and value.

    Fused RGB -> HSV -> RGB: with ``v = max``, ``c = max - min`` and hue ``h`` in sixths of a turn, each
    channel is ``v - c·clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h) mod 6``, n = 5, 3, 1 for r, g, b
    (since ``v·s = c``, saturation is never materialised). Grey pixels have ``c = 0`` and stay unchanged.
    """
    r, g, b = img[..., 0:1, :, :], img[..., 1:2, :, :], img[..., 2:3, :, :]
    minc, maxc = img.aminmax(dim=-3, keepdim=True)
    chroma = maxc - minc
    # Where all channels are equal the numerators are 0 too; the clamp only avoids 0 / 0.
    inv_chroma = chroma.clamp(min=1e-12).reciprocal_()
    # Hue sector from the max channel; ties resolve r, then g, then b (as torchvision).
    hue6 = torch.where(
        maxc == r, g - b, torch.where(maxc == g, torch.add(b - r, chroma, alpha=2), torch.add(r - g, chroma, alpha=4))
    )
    offsets = torch.tensor((5.0, 3.0, 1.0), dtype=img.dtype).view(3, 1, 1) + 6.0 * factor
    k = torch.remainder(hue6.mul_(inv_chroma) + offsets, 6.0)
    return maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def color_jitter(
    img: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision ``ColorJitter``: a random order of the four ops, factors drawn once per call."""
    order = torch.randperm(4, generator=generator).tolist()
    factors = (
        _uniform(max(0.0, 1 - brightness), 1 + brightness, generator),
        _uniform(max(0.0, 1 - contrast), 1 + contrast, generator),
        _uniform(max(0.0, 1 - saturation), 1 + saturation, generator),
        _uniform(-hue, hue, generator),
    )
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for i in order:
        img = ops[i](img, factors[i])
    return img


def solarize(img: Tensor, threshold: float = 128 / 255) -> Tensor:
    """Invert pixels at or above ``threshold`` (128 of 255 by default, as DINOv2 on uint8 PIL images)."""
    return torch.where(img >= threshold, 1.0 - img, img)


# ---------------------------------------------------------------- blur and normalisation
def gaussian_kernel1d(kernel_size: int, sigma: float) -> Tensor:
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=32)
def _reflect_taps(length: int, kernel_size: int) -> Tensor:
    """``(length, kernel_size)`` source index of each tap of a centred kernel, reflect-padded at the borders."""
    pad = kernel_size // 2
    idx = (torch.arange(length)[:, None] + torch.arange(-pad, pad + 1)[None]).abs()
    return torch.where(idx > length - 1, 2 * (length - 1) - idx, idx)


def _blur_matrix(length: int, kernel: Tensor) -> Tensor:
    """Banded ``(length, length)`` matrix applying ``kernel`` along one axis with reflect padding folded in."""
    taps = _reflect_taps(length, kernel.numel())
    return torch.zeros(length, length, dtype=kernel.dtype).scatter_add_(1, taps, kernel.expand_as(taps).contiguous())


def gaussian_blur(img: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of a float CHW image with reflect padding (torchvision's ``gaussian_blur``).

    Applied as ``B_h @ img @ B_w.T`` with banded matrices: on small crops one CPU matmul is several
    times cheaper than torch's depthwise ``conv2d``.
    """
    if kernel_size % 2 != 1 or kernel_size // 2 >= min(img.shape[-2:]):
        raise ValueError(f"kernel_size must be odd and its half smaller than the image, got {kernel_size}")
    kernel = gaussian_kernel1d(kernel_size, sigma).to(img.dtype)
    rows = _blur_matrix(img.shape[-2], kernel)
    cols = rows if img.shape[-1] == img.shape[-2] else _blur_matrix(img.shape[-1], kernel)
    return rows @ img @ cols.T


def random_gaussian_blur(
    img: Tensor,
    p: float,
    kernel_size: int = 9,
    sigma: tuple[float, float] = (0.1, 2.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Blur with probability ``p`` (the real apply probability) and sigma uniform in ``sigma``."""
    if not _coin(p, generator):
        return img
    return gaussian_blur(img, kernel_size, _uniform(sigma[0], sigma[1], generator))


def normalize(img: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """``(img - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    inv_std = 1.0 / torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
    return (img - mean_t).mul_(inv_std)


# ---------------------------------------------------------------- DINOv2 multi-crop
class MultiCropTransform:
    """DINOv2's ``DataAugmentationDINO``: 2 global and ``local_crops_number`` local crops of one image.

    Per crop: RandomResizedCrop (bicubic) + hflip 0.5, colour jitter with p=0.8 (brightness 0.4,
    contrast 0.4, saturation 0.2, hue 0.1), grayscale p=0.2, Gaussian blur (kernel 9, sigma in
    [0.1, 2.0]) with the crop's blur probability, solarize (p=``solarize_prob``) on the second global
    crop only, ImageNet normalisation. ``blur_probabilities`` selects the (global1, global2, local)
    blur probabilities: ``"dinov2"`` = (0.0, 0.9, 0.5), what DINOv2 effectively trains with because of
    its inverted-probability bug, or ``"intended"`` = (1.0, 0.1, 0.5), the values written in its code.

    ``__call__(uint8 (3, H, W)) -> {"global_crops": [g1, g2], "local_crops": [l1, ...]}`` of float32
    normalised CHW tensors. Random draws use torch's global RNG unless a ``generator`` is passed (see the
    module docstring for how DataLoader workers are seeded).
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        local_crops_number: int = 8,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        blur_probabilities: str = "dinov2",
        solarize_prob: float = 0.2,
    ) -> None:
        if blur_probabilities not in BLUR_PROBABILITIES:
            raise ValueError(
                f"blur_probabilities must be one of {sorted(BLUR_PROBABILITIES)}, got {blur_probabilities!r}"
            )
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.local_crops_number = local_crops_number
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.blur_probabilities = blur_probabilities
        self.global1_blur_prob, self.global2_blur_prob, self.local_blur_prob = BLUR_PROBABILITIES[blur_probabilities]
        self.solarize_prob = solarize_prob

    def _crop(
        self,
        img: Tensor,
        size: int,
        scale: tuple[float, float],
        blur_prob: float,
        solarize_prob: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        x = random_horizontal_flip(random_resized_crop(img, size, scale, generator=generator), generator=generator)
        if _coin(0.8, generator):
            x = color_jitter(x, generator=generator)
        if _coin(0.2, generator):
            x = rgb_to_grayscale(x)
        x = random_gaussian_blur(x, blur_prob, generator=generator)
        if solarize_prob > 0 and _coin(solarize_prob, generator):
            x = solarize(x)
        return normalize(x)

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> dict[str, list[Tensor]]:
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(img.shape)}")
        g, gs = self.global_crops_size, self.global_crops_scale
        global_crops = [
            self._crop(img, g, gs, self.global1_blur_prob, 0.0, generator),
            self._crop(img, g, gs, self.global2_blur_prob, self.solarize_prob, generator),
        ]
        local_crops = [
            self._crop(img, self.local_crops_size, self.local_crops_scale, self.local_blur_prob, 0.0, generator)
            for _ in range(self.local_crops_number)
        ]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global={self.global_crops_size}px {self.global_crops_scale}, "
            f"local={self.local_crops_number}x{self.local_crops_size}px {self.local_crops_scale}, "
            f"blur={self.blur_probabilities}, solarize_prob={self.solarize_prob})"
        )

"""DINOv2's classification transforms (evaluation and linear-probe training), checked by hand and against PIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_eval_transform_of_a_constant_image_by_hand():
    img = torch.empty(3, 40, 60, dtype=torch.uint8)
    for c, v in enumerate((10, 128, 250)):
        img[c] = v
    out = eval_transform(28)(img)  # shorter side 40 -> round(28 * 256 / 224) = 32, then crop 28
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    want = (torch.tensor([10, 128, 250]).view(3, 1, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(out, want.expand(3, 28, 28), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("height", "width"), [(50, 101), (90, 64), (30, 30)])
def test_eval_transform_matches_pil_resize_and_center_crop(height, width):
    """DINOv2 resizes a PIL image (bicubic; shorter side, longer side truncated) and centre-crops
    (offsets rounded): computed here with PIL itself."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    arr = np.array(Image.fromarray(arr).resize((width // 3, height // 3)).resize((width, height)))  # smoother
    resize, crop = 37, 32  # resize_size = round(32 * 256 / 224) = 37
    short, long = sorted((height, width))
    new_long = int(resize * long / short)
    size = (new_long, resize) if width >= height else (resize, new_long)  # PIL: (w, h)
    resized = np.asarray(Image.fromarray(arr).resize(size, Image.BICUBIC), dtype=np.float32)
    top, left = round((resized.shape[0] - crop) / 2), round((resized.shape[1] - crop) / 2)
    want = torch.from_numpy(resized[top : top + crop, left : left + crop]).permute(2, 0, 1) / 255
    got = eval_transform(32)(torch.from_numpy(arr).permute(2, 0, 1).contiguous()) * STD + MEAN
    assert got.shape == (3, crop, crop)
    assert (got - want).abs().max() <= 1.5 / 255  # uint8 rounding: torch and PIL differ by at most 1 level


def test_train_transform_is_seeded_by_the_generator():
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    t = train_transform(24)
    a = t(img, generator=torch.Generator().manual_seed(1))
    b = t(img, generator=torch.Generator().manual_seed(1))
    c = t(img, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    flat = torch.full((3, 50, 70), 128, dtype=torch.uint8)  # any crop and flip of a constant image
    want = ((128 / 255 - MEAN) / STD).expand(3, 24, 24)
    torch.testing.assert_close(t(flat, generator=torch.Generator().manual_seed(3)), want, rtol=0, atol=1e-6)

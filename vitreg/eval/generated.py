"""Generated object-discovery images: one textured rectangle on a smooth background per image.

The embedded default of ``train/analyze.py task=lost`` (no dataset needed), and a worked example of the
boxes JSON format (``vitreg/eval/boxes.py``): the folder holds the PNGs and ``boxes.json``. A trained
model should find the rectangle; the numbers say nothing about natural images (use VOC for those).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def object_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(uint8 image (H, W, 3), its object's box (x0, y0, x1, y1), x1/y1 exclusive)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(-1, 1, size=2)
    ramp = (direction[0] * yy / height + direction[1] * xx / width + 2) / 4  # smooth, in [0.25, 0.75]
    tint = rng.uniform(0.5, 1.0, size=3)
    image = ramp[..., None] * tint[None, None, :]
    box_h = int(rng.integers(height // 5, height // 2 + 1))
    box_w = int(rng.integers(width // 5, width // 2 + 1))
    y0 = int(rng.integers(0, height - box_h + 1))
    x0 = int(rng.integers(0, width - box_w + 1))
    cell = int(rng.integers(3, 9))  # a checkerboard of random colours: nothing like the background
    colours = rng.uniform(0, 1, size=(2, 3))
    ys, xs = np.mgrid[0:box_h, 0:box_w]
    image[y0 : y0 + box_h, x0 : x0 + box_w] = colours[((ys // cell + xs // cell) % 2)]
    return (image * 255).round().astype(np.uint8), (x0, y0, x0 + box_w, y0 + box_h)


def write_object_images(folder: str | Path, num_images: int, size: int = 224, seed: int = 0) -> Path:
    """Write ``num_images`` PNGs (sizes around ``size``, not multiples of a patch) and ``boxes.json``;
    returns the JSON path (readable by ``load_box_dataset``). Same arguments, same files."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(num_images):
        h, w = (int(s) for s in rng.integers(int(size * 0.75), int(size * 1.25) + 1, size=2))
        image, box = object_image(rng, h, w)
        name = f"object_{i:05d}.png"
        Image.fromarray(image).save(folder / name)
        entries.append({"file": name, "boxes": [list(box)]})
    path = folder / "boxes.json"
    path.write_text(json.dumps({"images": entries}, indent=1))
    return path

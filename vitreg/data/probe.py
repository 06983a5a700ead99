"""Probe images: a fixed set of images that telemetry and the label-free analyses measure on, the same
pixels at every measurement and after a resume.

Images are kept as uint8 (B, 3, S, S) squares (``center_square``), drawn once from the synthetic set or
from any ``image_source`` (a folder, an image, a list file, shards) in a stable order, and saved with the
run; ``probe_tensor`` turns them into the normalised batch at any resolution.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitreg.data.decode import DecodeError, decode_image
from vitreg.data.sources import encoded_images, image_source
from vitreg.data.synthetic import SyntheticShapes
from vitreg.data.tar import SkipCounter
from vitreg.data.transforms import ResizeNormalize, center_square
from vitreg.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


def probe_tensor(images: Tensor, resolution: int) -> Tensor:
    """uint8 probe images (B, 3, S, S) -> normalised float batch (B, 3, resolution, resolution)."""
    transform = ResizeNormalize(resolution)
    return torch.stack([transform(img) for img in images])


def synthetic_probe(num_images: int, image_size: int, seed: int, num_classes: int = 10, size: int = 224) -> Tensor:
    """Held-out ("val" split) synthetic images, never seen in training."""
    data = SyntheticShapes(num_images, image_size=image_size, num_classes=num_classes, seed=seed, split="val")
    rendered = (torch.from_numpy(data.render(i)[0]).permute(2, 0, 1).contiguous() for i in range(num_images))
    return torch.stack([center_square(img, size) for img in rendered])


def image_probe(source: str | os.PathLike | Sequence[str], num_images: int, size: int = 224) -> Tensor:
    """The first ``num_images`` decodable images of ``source`` (``image_source``: a folder, an image, a
    list file or shards, in their stable order), as uint8 squares. Undecodable images are skipped with a
    warning, as are unreadable or truncated shards."""
    images = []
    for name, data in encoded_images(image_source(source), SkipCounter()):
        try:
            img = decode_image(data, min_side=8)
        except DecodeError as err:
            log.warning("probe images: skipping %s (%s)", name, err.reason)
            continue
        images.append(center_square(img, size))
        if len(images) == num_images:
            break
    if not images:
        raise ValueError(f"no decodable image found in {source}")
    if len(images) < num_images:
        log.warning("probe images: only %d of the %d requested images in %s", len(images), num_images, source)
    return torch.stack(images)


def save_probe(images: Tensor, path: str | os.PathLike) -> None:
    """Write the uint8 probe images (B, 3, S, S) as a compressed ``.npz`` (``images``: B, S, S, 3)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images.permute(0, 2, 3, 1).numpy())
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_probe(path: str | os.PathLike) -> Tensor:
    """The uint8 probe images (B, 3, S, S) that ``save_probe`` wrote."""
    with np.load(path) as data:
        return torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()

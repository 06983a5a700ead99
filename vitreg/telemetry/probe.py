"""The fixed probe images telemetry measures on: the same pixels at every measurement and after resume.

Images are kept as uint8 (B, 3, S, S) squares (centre crop, antialiased bicubic resize), drawn once
from the synthetic set, from shards or from a folder, in a stable order; ``probe_tensor`` turns them
into the normalised batch at any resolution.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitreg.data.decode import DecodeError, decode_image
from vitreg.data.transforms import normalize, resize

log = logging.getLogger(__name__)


def square(img: Tensor, size: int) -> Tensor:
    """Centre square crop of a (3, H, W) uint8 image, resized to (3, size, size) uint8."""
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[:, top : top + side, left : left + side]
    return (resize(crop.contiguous(), size) * 255).round().to(torch.uint8)


def probe_tensor(images: Tensor, resolution: int) -> Tensor:
    """uint8 probe images (B, 3, S, S) -> normalised float batch (B, 3, resolution, resolution)."""
    return torch.stack([normalize(resize(img, resolution)) for img in images])


def synthetic_probe(num_images: int, image_size: int, seed: int, num_classes: int = 10, size: int = 224) -> Tensor:
    """Held-out ("val" split) synthetic images, never seen in training."""
    from vitreg.data.synthetic import SyntheticShapes

    data = SyntheticShapes(num_images, image_size=image_size, num_classes=num_classes, seed=seed, split="val")
    rendered = (torch.from_numpy(data.render(i)[0]).permute(2, 0, 1).contiguous() for i in range(num_images))
    return torch.stack([square(img, size) for img in rendered])


def _decoded(blobs: Iterator[tuple[str, bytes]]) -> Iterator[Tensor]:
    for name, data in blobs:
        try:
            yield decode_image(data, min_side=8)
        except DecodeError as err:
            log.warning("probe images: skipping %s (%s)", name, err.reason)


def _folder_blobs(folder: Path) -> Iterator[tuple[str, bytes]]:
    from vitreg.data.shards import find_images

    items, _ = find_images(folder)
    for item in items:
        path = Path(item.path) if Path(item.path).is_absolute() else folder / item.path
        yield str(path), path.read_bytes()


def _shard_blobs(shards: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """The image bytes of each sample, through the training reader (unreadable or truncated shards
    are skipped with a warning, never raised)."""
    from vitreg.data.webdataset import IMAGE_EXTENSIONS, SkipCounter, iter_tar_samples

    skips = SkipCounter()
    for shard in shards:
        for sample in iter_tar_samples(shard, skips):
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is not None:
                yield f"{shard}:{sample['__key__']}", sample[ext]


def image_probe(source: str | os.PathLike | Sequence[str], num_images: int, size: int = 224) -> Tensor:
    """The first ``num_images`` decodable images of a folder (stable order) or of shards (a folder
    of ``.tar``, a brace pattern or a list), as uint8 squares."""
    from vitreg.data.shards import list_shards

    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and path.is_dir() and not any(path.glob("*.tar")):
        blobs = _folder_blobs(path)
    elif path is not None and path.is_file() and path.suffix.lower() != ".tar":
        blobs = iter([(str(path), path.read_bytes())])
    else:
        blobs = _shard_blobs(list_shards(source))
    images = []
    for img in _decoded(blobs):
        images.append(square(img, size))
        if len(images) == num_images:
            break
    if not images:
        raise ValueError(f"no decodable image found in {source}")
    if len(images) < num_images:
        log.warning("probe images: only %d of the %d requested images in %s", len(images), num_images, source)
    return torch.stack(images)


def save_probe(images: Tensor, path: str | os.PathLike) -> None:
    """Write the uint8 probe images (B, 3, S, S) as a compressed ``.npz`` (``images``: B, S, S, 3)."""
    from vitreg.utils.io import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images.permute(0, 2, 3, 1).numpy())
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_probe(path: str | os.PathLike) -> Tensor:
    with np.load(path) as data:
        return torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()

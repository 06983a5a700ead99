"""An embedded, generated-in-code image dataset whose labels are the SHAPE of one main object.

Everything that is not the shape (position, scale, rotation, colours, object texture, background,
small distractors) is random, so an image's label can only be recovered from its geometry. That gives
self-supervised pretraining something real to learn and a k-NN / linear probe something to measure,
with no download and no disk I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

_SPLITS = {"train": 0, "val": 1}
_TEXTURES = ("solid", "stripes", "checker", "dots")


# ---------------------------------------------------------------- shape masks
# Each shape takes object-frame coordinates (u, v), already rotated and divided by the object's radius,
# so the shape fills roughly the unit disc, and returns a bool mask.
def _polygon(u: np.ndarray, v: np.ndarray, sides: int, phase: float = 0.0) -> np.ndarray:
    """Regular polygon with circumradius 1: inside when the point's distance along its sector's apothem fits."""
    r = np.hypot(u, v)
    sector = 2 * np.pi / sides
    theta = np.mod(np.arctan2(v, u) + phase, sector) - sector / 2
    return r * np.cos(theta) <= np.cos(np.pi / sides)


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 0.85


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.72


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _polygon(u, v, 3, phase=np.pi / 2)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Radius oscillates linearly between 0.42 and 1 with five peaks: a five-pointed star.
    tri = np.abs(np.mod(np.arctan2(v, u) * (5 / (2 * np.pi)), 1.0) - 0.5) * 2
    return np.hypot(u, v) <= 0.42 + 0.58 * tri


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 0.9) & (r2 >= 0.36)


def _ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + (v / 0.45) ** 2 <= 1.0


def _hexagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _polygon(u, v, 6)


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Elongated rhombus, so it is not just a rotated square.
    return np.abs(u) / 0.55 + np.abs(v) <= 1.0


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 0.9) & ((u - 0.42) ** 2 + v * v >= 0.55)


def _semicircle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 0.95) & (v >= -0.1)


def _frame(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    m = np.maximum(np.abs(u), np.abs(v))
    return (m <= 0.75) & (m >= 0.45)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "ellipse": _ellipse,
    "diamond": _diamond,
    "crescent": _crescent,
    "semicircle": _semicircle,
    "frame": _frame,
    "hexagon": _hexagon,  # last: only a few pixels of corner tell it from a circle, so not a default class
}


# ---------------------------------------------------------------- rendering
def _random_colour(rng: np.random.Generator, away_from: np.ndarray | None = None) -> np.ndarray:
    """An RGB colour in [0, 1]; with ``away_from``, resampled until clearly distinct from it (visible object)."""
    for _ in range(8):
        colour = rng.random(3, dtype=np.float32)
        if away_from is None or np.abs(colour - away_from).sum() > 0.6:
            break
    return colour


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A greyish colour with a slight tint: backgrounds that vary without out-shouting the object."""
    return np.clip(rng.uniform(0.15, 0.85) + rng.normal(0.0, 0.05, size=3), 0.0, 1.0).astype(np.float32)


def _background(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, muted: bool = False) -> np.ndarray:
    """Linear two-colour gradient plus a low-frequency wave and pixel noise, (H, W, 3) float32 in ~[0, 1]."""
    pick = _muted_colour if muted else _random_colour
    c0, c1 = pick(rng), pick(rng)
    angle = rng.uniform(0, 2 * np.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    t = (cos * xs + sin * ys) * (0.5 / (abs(cos) + abs(sin))) + 0.5  # in [0, 1] on the [-1, 1] grid
    img = c0 + (c1 - c0) * t[..., None]
    freq, phase, amp = rng.uniform(2, 8), rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.15)
    wave_angle = rng.uniform(0, np.pi)
    wave = amp * np.sin((freq * math.cos(wave_angle)) * xs + (freq * math.sin(wave_angle)) * ys + phase)
    img += wave[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.0, 0.06)
    return img


def _class_colour(rng: np.random.Generator, label: int, num_classes: int) -> np.ndarray:
    """A saturated colour around the class's own hue (classes spread evenly on the hue circle)."""
    hue = (label / num_classes + rng.normal(0.0, 0.15 / num_classes)) % 1.0
    sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0)
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32) + hue * 6.0) % 6.0  # HSV -> RGB, vectorised
    return (val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, kind: str | None = None) -> np.ndarray | None:
    """Bool pattern (second-colour pixels) in object coordinates, or None for a solid fill."""
    kind = kind or _TEXTURES[rng.integers(len(_TEXTURES))]
    freq = rng.uniform(2.5, 5.0)
    if kind == "stripes":
        return np.sin(freq * np.pi * u) > 0
    if kind == "checker":
        return (np.sin(freq * np.pi * u) > 0) ^ (np.sin(freq * np.pi * v) > 0)
    if kind == "dots":
        fu, fv = np.mod(u * freq, 1.0) - 0.5, np.mod(v * freq, 1.0) - 0.5
        return fu * fu + fv * fv < 0.09
    return None


def _paint(
    img: np.ndarray,
    rng: np.random.Generator,
    shape: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ys: np.ndarray,
    xs: np.ndarray,
    radius: float,
    textured: bool,
    colour: np.ndarray | None = None,
    texture: str | None = None,
) -> None:
    """Draw one randomly placed, rotated, coloured (optionally textured) shape of ``radius`` onto ``img``."""
    size = img.shape[0]
    cy, cx = (float(c) for c in rng.uniform(radius, size - radius, size=2))
    angle = rng.uniform(0, 2 * np.pi)
    # Only the object's bounding box is evaluated: rendering cost then scales with object, not image, area.
    r = int(np.ceil(radius)) + 1
    y0, y1, x0, x1 = max(int(cy) - r, 0), min(int(cy) + r + 1, size), max(int(cx) - r, 0), min(int(cx) + r + 1, size)
    dy, dx = (ys[y0:y1, x0:x1] - cy) / radius, (xs[y0:y1, x0:x1] - cx) / radius
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    mask = shape(u, v)
    patch = img[y0:y1, x0:x1]
    if colour is None:
        colour = _random_colour(rng, away_from=patch.mean(axis=(0, 1)))
    patch[mask] = colour
    # Second colour: a darker shade of the first.
    pattern = _texture(rng, u, v, texture) if textured else None
    if pattern is not None:
        patch[mask & pattern] = colour * np.float32(rng.uniform(0.2, 0.6))


class SyntheticShapes(Dataset):
    """Procedurally rendered RGB images of one labelled shape on a cluttered background.

    Item ``index`` of ``(seed, split)`` is rendered from a NumPy generator seeded by ``(seed, split, index)``
    alone, so it is identical in every worker, epoch and access order, and the train and val splits are
    disjoint random streams. Labels are ``index % num_classes`` (exactly balanced). Returns
    ``(image, label)`` with ``image`` a ``(3, image_size, image_size)`` uint8 tensor, or ``transform(image)``.

    With ``class_appearance`` (default) a class is a shape *and* a typical look: the object's hue is
    drawn around the class's own hue and its texture is the class's texture, as real categories have
    typical colours and surfaces, and backgrounds are muted (greyish gradients, waves and noise) so
    the object is what two crops of an image mostly share. Without it, object and background colours
    are random and only the shape carries the class: a much harder task, where a short
    self-supervised run learns to match crops by background colour instead.
    """

    def __init__(
        self,
        num_images: int,
        image_size: int = 112,
        num_classes: int = 10,
        seed: int = 0,
        split: str = "train",
        transform: Callable[[torch.Tensor], Any] | None = None,
        max_distractors: int = 2,
        class_appearance: bool = True,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [1, {len(SHAPES)}] (one shape per class), got {num_classes}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 px to draw recognisable shapes, got {image_size}")
        self.num_images = num_images
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.split = split
        self.transform = transform
        self.max_distractors = max_distractors
        self.class_appearance = class_appearance
        self.class_names: list[str] = list(SHAPES)[:num_classes]
        self._shapes = [SHAPES[name] for name in SHAPES]
        # Pixel-centre coordinate grid, built once and shared by every render.
        coords = np.arange(image_size, dtype=np.float32) + 0.5
        self._ys, self._xs = np.meshgrid(coords, coords, indexing="ij")
        self._unit_ys, self._unit_xs = self._ys / image_size * 2 - 1, self._xs / image_size * 2 - 1

    def __len__(self) -> int:
        return self.num_images

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """Return the ``(H, W, 3)`` uint8 image and label of item ``index``."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        label = index % self.num_classes
        size = self.image_size
        img = _background(rng, self._unit_ys, self._unit_xs, muted=self.class_appearance)
        # Distractors: any shape, at most a third of the main object's size, drawn underneath it.
        for _ in range(rng.integers(self.max_distractors + 1)):
            shape = self._shapes[rng.integers(len(self._shapes))]
            _paint(img, rng, shape, self._ys, self._xs, size * rng.uniform(0.05, 0.09), textured=False)
        radius = size * rng.uniform(0.2, 0.38)
        colour = _class_colour(rng, label, self.num_classes) if self.class_appearance else None
        texture = _TEXTURES[label % len(_TEXTURES)] if self.class_appearance else None
        _paint(img, rng, self._shapes[label], self._ys, self._xs, radius, True, colour, texture)
        return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.render(index)
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return (self.transform(tensor) if self.transform is not None else tensor), label

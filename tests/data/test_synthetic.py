"""``SyntheticShapes``: deterministic per-index rendering, disjoint splits, balanced and distinguishable classes."""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
import torch

from vitreg.data.synthetic import SHAPES, SyntheticShapes


def test_item_dtype_shape_and_label() -> None:
    ds = SyntheticShapes(20, image_size=48)
    img, label = ds[13]
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 48) and img.is_contiguous()
    assert isinstance(label, int) and label == 13 % 10
    assert len(ds) == 20


def test_rendering_is_deterministic_and_order_independent() -> None:
    a = SyntheticShapes(50, image_size=40, seed=3)
    b = SyntheticShapes(50, image_size=40, seed=3)
    forward = [a[i][0] for i in (4, 9, 4)]
    backward = [b[i][0] for i in (9, 4)]
    assert torch.equal(forward[0], forward[2])
    assert torch.equal(forward[0], backward[1]) and torch.equal(forward[1], backward[0])


def test_indices_splits_and_seeds_differ() -> None:
    train = SyntheticShapes(30, image_size=40)
    imgs = [train[i][0] for i in range(30)]
    assert all(not torch.equal(x, y) for x, y in itertools.combinations(imgs, 2))
    val = SyntheticShapes(30, image_size=40, split="val")
    other_seed = SyntheticShapes(30, image_size=40, seed=1)
    for i in range(5):
        assert not torch.equal(train[i][0], val[i][0])
        assert not torch.equal(train[i][0], other_seed[i][0])
        assert train[i][1] == val[i][1]


def test_labels_are_balanced_and_named() -> None:
    ds = SyntheticShapes(120, image_size=32, num_classes=12)
    counts = np.bincount([ds[i][1] for i in range(len(ds))], minlength=12)
    assert (counts == 10).all()
    assert ds.class_names == list(SHAPES)[:12] and len(set(ds.class_names)) == 12
    assert SyntheticShapes(5, num_classes=4).class_names == list(SHAPES)[:4]


def test_images_are_not_flat() -> None:
    # Background gradient/noise plus an object: every image spans a wide range of values.
    ds = SyntheticShapes(10, image_size=64)
    for i in range(10):
        img = ds[i][0].float()
        assert img.std() > 10 and img.max() - img.min() > 80


def test_transform_is_applied_to_the_uint8_tensor() -> None:
    seen = []

    def transform(img: torch.Tensor) -> torch.Tensor:
        seen.append((img.dtype, tuple(img.shape)))
        return img.float() / 255

    img, _ = SyntheticShapes(3, image_size=32, transform=transform)[1]
    assert seen == [(torch.uint8, (3, 32, 32))] and img.dtype == torch.float32


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(4, split="test")
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(4, num_classes=len(SHAPES) + 1)
    with pytest.raises(IndexError):
        SyntheticShapes(4)[4]


def test_shapes_are_sizeable_and_pairwise_distinct() -> None:
    """Every class shape covers a fair part of its frame, and no two shapes match even after rotation."""
    assert len(SHAPES) >= 10
    coords = np.linspace(-1, 1, 101)
    v, u = np.meshgrid(coords, coords, indexing="ij")
    masks = {name: fn(u, v) for name, fn in SHAPES.items()}
    for name, mask in masks.items():
        assert 0.1 < mask.mean() < 0.8, name

    def best_iou(a: np.ndarray, name_b: str) -> float:
        best = 0.0
        for angle in np.linspace(0, 2 * np.pi, 36, endpoint=False):
            c, s = np.cos(angle), np.sin(angle)
            b = SHAPES[name_b](c * u + s * v, -s * u + c * v)
            best = max(best, (a & b).sum() / (a | b).sum())
        return best

    defaults = SyntheticShapes(1).class_names
    for name_a, name_b in itertools.combinations(SHAPES, 2):
        limit = 0.8 if name_a in defaults and name_b in defaults else 0.95
        assert best_iou(masks[name_a], name_b) < limit, (name_a, name_b)


def _object_hue(img: np.ndarray) -> float:
    """Mean hue of the clearly saturated pixels: the object (backgrounds are muted)."""
    rgb = img.reshape(-1, 3).astype(np.float64) / 255
    sat = rgb.max(1) - rgb.min(1)
    top = rgb[sat >= 0.3]
    hues = [colorsys.rgb_to_hsv(*p)[0] for p in top]
    angles = np.array(hues) * 2 * np.pi
    return float(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean()) / (2 * np.pi) % 1.0)


def test_class_appearance_ties_hue_to_the_class_and_mutes_backgrounds() -> None:
    data = SyntheticShapes(40, image_size=48, num_classes=10, seed=3, max_distractors=0)
    for index in range(40):
        img, label = data.render(index)
        # circular distance between the object's hue and the class hue (classes 0.1 apart)
        delta = abs((_object_hue(img) - label / 10 + 0.5) % 1.0 - 0.5)
        assert delta < 0.05, (index, label, delta)
    plain = SyntheticShapes(40, image_size=48, num_classes=10, seed=3, class_appearance=False)

    # corners are background: muted (low saturation) with class appearance, colourful without
    def corner_saturation(ds: SyntheticShapes) -> float:
        corners = np.stack([ds.render(i)[0][:4, :4] for i in range(40)]).astype(np.float64) / 255
        return float((corners.max(-1) - corners.min(-1)).mean())

    assert corner_saturation(data) < 0.2 < corner_saturation(plain)

"""Generated object images: the box in boxes.json is exactly the textured rectangle."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitreg.eval.boxes import load_box_dataset
from vitreg.eval.generated import object_image, write_object_images


def test_box_is_exactly_the_object():
    rng = np.random.default_rng(3)
    for _ in range(20):
        image, (x0, y0, x1, y1) = object_image(rng, 50, 70)
        assert 0 <= x0 < x1 <= 70 and 0 <= y0 < y1 <= 50
        inside = image[y0:y1, x0:x1].reshape(-1, 3)
        assert len(np.unique(inside, axis=0)) == 2  # a two-colour checkerboard
        # the smooth background changes by at most a few levels between neighbours; the box edge jumps
        background = image.astype(int).copy()
        background[y0:y1, x0:x1] = -1000
        rows = np.abs(np.diff(background, axis=0))
        assert rows[(background[1:] >= 0) & (background[:-1] >= 0)].max() <= 3


def test_written_dataset_round_trips(tmp_path):
    path = write_object_images(tmp_path / "gen", num_images=5, size=64, seed=1)
    dataset = load_box_dataset(path)
    assert len(dataset) == 5
    for item in dataset:
        w, h = Image.open(item.path).size
        assert len(item.boxes) == 1
        x1, y1 = item.boxes[0][2:]
        assert 48 <= w <= 80 and 48 <= h <= 80 and x1 <= w and y1 <= h
    again = write_object_images(tmp_path / "again", num_images=5, size=64, seed=1)
    assert again.read_text() == path.read_text()


def test_rejects_empty():
    with pytest.raises(ValueError, match="num_images"):
        write_object_images("unused", 0)

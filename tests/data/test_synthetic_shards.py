"""The demo's synthetic shards: written once, identical everywhere, never half-written."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitreg.data.synthetic_shards as mod
from vitreg.data.synthetic import SyntheticShapes


def test_written_once_then_reused_and_deterministic(tmp_path):
    kwargs = dict(num_images=10, image_size=32, num_classes=3, seed=0, per_shard=4)
    first = mod.ensure_synthetic_shards(tmp_path / "a", **kwargs)
    assert [p.rsplit("/", 1)[-1] for p in first] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    stamp = [(p, os.path.getmtime(p)) for p in first]
    again = mod.ensure_synthetic_shards(tmp_path / "a", **kwargs)
    assert again == first and stamp == [(p, os.path.getmtime(p)) for p in again]  # reused
    other = mod.ensure_synthetic_shards(tmp_path / "b", **kwargs)
    assert [Path(p).read_bytes() for p in other] == [Path(p).read_bytes() for p in first]  # byte-identical
    with tarfile.open(first[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["00000000.jpg", "00000000.cls"]
        label = int(tar.extractfile("00000001.cls").read())
        pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile("00000001.jpg").read())))
    img, expected_label = SyntheticShapes(10, 32, 3, 0).render(1)
    # JPEG (4:2:0) drops the pixel noise of the background; 4x4 block means must agree
    blocks = [a.astype(float).reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)) for a in (pixels, img)]
    assert label == expected_label and np.abs(blocks[0] - blocks[1]).mean() < 4
    assert mod.ensure_synthetic_shards(tmp_path / "a", **{**kwargs, "seed": 1}) != first  # new params, new folder


def test_an_interrupted_first_run_leaves_no_cache(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod.SyntheticShapes, "render", boom)
    with pytest.raises(KeyboardInterrupt):
        mod.ensure_synthetic_shards(tmp_path, num_images=4, image_size=32, num_classes=2, seed=0)
    assert list(tmp_path.iterdir()) == []

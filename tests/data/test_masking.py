"""``BlockMaskGenerator``: budget invariants, statistics, and draw-for-draw agreement with DINOv2's procedure."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from vitreg.data.masking import BlockMaskGenerator


def reference_mask(height: int, width: int, target: int, max_patches: float, rng: random.Random) -> list[list[bool]]:
    """DINOv2's masking procedure restated on nested lists, consuming ``rng`` in the same order.

    Per rectangle, up to 10 draws of (area ~ U[4, budget], log-aspect ~ U[log 0.3, log(1/0.3)]); a draw that
    fits strictly inside the grid also draws (top, left) and is kept when it masks 1..budget new patches.
    """
    grid = [[False] * width for _ in range(height)]
    done = 0
    while done < target:
        budget = min(target - done, max_patches)
        gained = 0
        for _ in range(10):
            area = rng.uniform(4, budget)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (h < height and w < width):
                continue
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
            fresh = [c for c in cells if not grid[c[0]][c[1]]]
            if 0 < len(fresh) <= budget:
                for i, j in fresh:
                    grid[i][j] = True
                gained = len(fresh)
                break
        if gained == 0:
            break
        done += gained
    return grid


@pytest.mark.parametrize("grid", [(8, 8), (16, 16), (6, 9)])
def test_matches_reference_draw_for_draw(grid: tuple[int, int]) -> None:
    gen = BlockMaskGenerator(grid)
    n = grid[0] * grid[1]
    for seed in range(30):
        target = random.Random(1000 + seed).randint(0, n // 2)
        ours = gen(target, random.Random(seed))
        ref = reference_mask(*grid, target, 0.5 * n, random.Random(seed))
        np.testing.assert_array_equal(ours, np.array(ref, dtype=bool))


def test_zero_request_gives_empty_mask() -> None:
    mask = BlockMaskGenerator((8, 8))(0, random.Random(0))
    assert mask.shape == (8, 8) and mask.dtype == bool and not mask.any()


@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (16, 16), (7, 9)])
def test_never_exceeds_target_and_is_close(grid: tuple[int, int]) -> None:
    gen = BlockMaskGenerator(grid)
    n = grid[0] * grid[1]
    rng = random.Random(0)
    ratios = []
    for _ in range(300):
        target = rng.randint(4, n // 2)
        count = int(gen(target, rng).sum())
        assert count <= target
        ratios.append(count / target)
    # It can fall short (a rectangle fails 10 draws), but on average lands within a few percent.
    assert np.mean(ratios) > 0.95


def test_defaults_and_reproducibility() -> None:
    gen = BlockMaskGenerator((16, 16))
    assert gen.max_num_patches == 128
    assert gen.log_aspect_range == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
    a, b = gen(60, random.Random(7)), gen(60, random.Random(7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gen(60, random.Random(8)))

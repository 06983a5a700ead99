"""BEiT-style block masking on the patch grid, as DINOv2's ``MaskingGenerator`` does it for iBOT."""

from __future__ import annotations

import math
import random

import numpy as np


class BlockMaskGenerator:
    """Masks of about ``num_masking_patches`` patches built from random rectangles on an ``(h, w)`` grid.

    Each rectangle has an area drawn uniformly in ``[min_num_patches, min(remaining, max_num_patches)]``
    and a log-uniform aspect ratio in ``[min_aspect, max_aspect]``; it must be strictly smaller than the
    grid on both sides. Up to 10 draws are tried per rectangle, and a draw is accepted only if it masks
    at least one new patch and no more than the remaining budget. Rectangles are added until the target is
    reached or a rectangle fails all 10 draws, so a mask can fall short of the target but never exceeds it.

    ``max_num_patches`` defaults to half the grid (DINOv2's ``0.5 * N``), ``max_aspect`` to ``1 / min_aspect``.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    def _add_rectangle(self, mask: np.ndarray, budget: float, rng: random.Random) -> int:
        """Try up to 10 rectangles; mask the first acceptable one and return how many patches it added."""
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if w >= self.width or h >= self.height:
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            region = mask[top : top + h, left : left + w]
            added = h * w - int(region.sum())
            if 0 < added <= budget:
                region[...] = True
                return added
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        """Bool ``(h, w)`` mask with at most ``num_masking_patches`` True entries."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_rectangle(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask

    def __repr__(self) -> str:
        lo, hi = (math.exp(a) for a in self.log_aspect_range)
        return (
            f"{type(self).__name__}(grid=({self.height}, {self.width}), patches=[{self.min_num_patches}, "
            f"{self.max_num_patches}], aspect=[{lo:.3f}, {hi:.3f}])"
        )

"""Batch collation for DINOv2 training: crop-major stacking plus the iBOT masks (``collate_data_and_cast``)."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from vitreg.data.masking import BlockMaskGenerator


class MultiCropCollator:
    """Collate ``(MultiCropTransform output, label)`` samples into one DINOv2 training batch.

    Returns a dict with

    * ``global_crops`` ``(2B, 3, G, G)`` and ``local_crops`` ``(L·B, 3, l, l)``, both crop-major (every
      image's crop 0, then every image's crop 1, ...). ``local_crops`` is ``None`` when there are no local
      crops, so callers skip them explicitly instead of running a zero-size batch. Images stay float32;
      mixed precision is left to the trainer (DINOv2 casts to half here).
    * ``masks`` ``(2B, N)`` bool with ``N = (G / patch_size)²``; ``mask_indices`` the flat indices of its
      True entries; ``masks_weight`` one float per masked token, ``1 / #masked`` in its image;
      ``n_masked_patches`` ``(1,)`` long; ``upperbound`` an int that bounds the masked-token count.
    * ``labels`` ``(B,)`` long.

    Masks follow DINOv2: ``int(2B · mask_sample_probability)`` images are masked, with ratios stratified
    over ``mask_ratio_min_max`` (image i draws a ratio uniformly in the i-th of that many equal strata),
    the rest get empty masks, and the list is shuffled so masks land on both global views.

    Randomness: a ``random.Random`` owned by the collator, created lazily per process. It is seeded from
    ``seed`` (or ``torch.initial_seed()`` when ``seed`` is None) mixed with the DataLoader worker's seed
    when running in a worker. Torch derives worker seeds from its global RNG afresh for every epoch's
    iterator, so workers and epochs get different masks, and a run is reproducible under
    ``torch.manual_seed``.
    """

    def __init__(
        self,
        patch_size: int,
        global_crops_size: int,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
        seed: int | None = None,
    ) -> None:
        if global_crops_size % patch_size != 0:
            lower = global_crops_size - global_crops_size % patch_size
            raise ValueError(
                f"augment.global_crops_size={global_crops_size} is not a multiple of the patch size {patch_size}; "
                f"set augment.global_crops_size to a multiple such as {lower} or {lower + patch_size}"
            )
        self.patch_size = patch_size
        self.global_crops_size = global_crops_size
        self.mask_ratio_min_max = tuple(mask_ratio_min_max)
        self.mask_sample_probability = mask_sample_probability
        self.seed = seed
        side = global_crops_size // patch_size
        self.n_tokens = side * side
        # DINOv2's expression, kept verbatim: it is 0.5 * N whenever G / 2 is a multiple of the patch size.
        max_num_patches = 0.5 * global_crops_size // patch_size * global_crops_size // patch_size
        self.mask_generator = BlockMaskGenerator((side, side), max_num_patches=max_num_patches)
        self._rng: random.Random | None = None
        self._rng_owner: tuple[int, int] | None = None

    def _get_rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        owner = (-1, 0) if info is None else (info.id, info.seed)
        # A collator pickled into a worker arrives with the parent's RNG; re-seed it for this worker.
        if self._rng is None or self._rng_owner != owner:
            base = torch.initial_seed() if self.seed is None else self.seed
            self._rng = random.Random(f"{base}:{owner[1]}" if info is not None else base)
            self._rng_owner = owner
        return self._rng

    def make_masks(self, num_images: int, rng: random.Random) -> tuple[Tensor, int]:
        """``(num_images, N)`` bool masks in shuffled order, and the ``upperbound`` of their True count."""
        n_tokens = self.n_tokens
        n_masked_images = int(num_images * self.mask_sample_probability)
        probs = torch.linspace(*self.mask_ratio_min_max, n_masked_images + 1)
        upperbound = 0
        masks = []
        for i in range(n_masked_images):
            lo, hi = probs[i].item(), probs[i + 1].item()
            masks.append(self.mask_generator(int(n_tokens * rng.uniform(lo, hi)), rng))
            upperbound += int(n_tokens * probs[i + 1])  # float32 product, as in DINOv2
        masks += [self.mask_generator(0, rng) for _ in range(num_images - n_masked_images)]
        rng.shuffle(masks)
        return torch.stack([torch.from_numpy(m).flatten() for m in masks]), upperbound

    def __call__(
        self, samples: list[tuple[dict[str, list[Tensor]], Any]], rng: random.Random | None = None
    ) -> dict[str, Any]:
        """Collate ``samples``; masks draw from ``rng`` when given (exact-resume streams seed one per
        batch), else from the collator's own per-process RNG."""
        crops = [s[0] for s in samples]
        n_global = len(crops[0]["global_crops"])
        n_local = len(crops[0]["local_crops"])
        global_crops = torch.stack([c["global_crops"][i] for i in range(n_global) for c in crops])
        local_crops = torch.stack([c["local_crops"][i] for i in range(n_local) for c in crops]) if n_local else None
        if global_crops.shape[-1] != self.global_crops_size or global_crops.shape[-2] != self.global_crops_size:
            raise ValueError(
                f"global crops are {tuple(global_crops.shape[-2:])} px but the collator was built for "
                f"augment.global_crops_size={self.global_crops_size}"
            )

        masks, upperbound = self.make_masks(len(global_crops), rng or self._get_rng())
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            **mask_fields(masks, upperbound),
            "labels": torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long),
        }


def mask_fields(masks: Tensor, upperbound: int) -> dict[str, Any]:
    """The batch's iBOT entries from ``(2B, N)`` bool masks: ``masks``, ``mask_indices``, ``masks_weight``,
    ``n_masked_patches`` and ``upperbound`` (see ``MultiCropCollator``)."""
    mask_indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1, keepdim=True).clamp(min=1).float()
    return {
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": (1.0 / per_image).expand_as(masks)[masks],
        "n_masked_patches": torch.full((1,), mask_indices.numel(), dtype=torch.long),
        "upperbound": upperbound,
    }

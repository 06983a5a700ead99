"""``MultiCropCollator``: crop-major stacking and DINOv2's stratified iBOT masks, against references in the test."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vitreg.data import collate as collate_module
from vitreg.data.collate import MultiCropCollator

G, PATCH, L, LOCAL = 28, 7, 3, 14  # 4x4 patch grid: N = 16
N = (G // PATCH) ** 2


def make_samples(batch: int, n_local: int = L) -> list[tuple[dict, int]]:
    """Constant crops whose value encodes (image, crop): global 10·b + v, local 1000 + 10·b + k."""
    return [
        (
            {
                "global_crops": [torch.full((3, G, G), 10.0 * b + v) for v in range(2)],
                "local_crops": [torch.full((3, LOCAL, LOCAL), 1000.0 + 10 * b + k) for k in range(n_local)],
            },
            100 + b,
        )
        for b in range(batch)
    ]


def test_crops_are_stacked_crop_major_and_labels_kept() -> None:
    batch = 5
    out = MultiCropCollator(PATCH, G, seed=0)(make_samples(batch))
    assert out["global_crops"].shape == (2 * batch, 3, G, G)
    assert out["local_crops"].shape == (L * batch, 3, LOCAL, LOCAL)
    assert out["global_crops"][:, 0, 0, 0].tolist() == [10.0 * b + v for v in range(2) for b in range(batch)]
    assert out["local_crops"][:, 0, 0, 0].tolist() == [1000.0 + 10 * b + k for k in range(L) for b in range(batch)]
    assert out["labels"].dtype == torch.long and out["labels"].tolist() == [100 + b for b in range(batch)]


def test_no_local_crops_gives_none() -> None:
    out = MultiCropCollator(PATCH, G, seed=0)(make_samples(2, n_local=0))
    assert out["local_crops"] is None and out["global_crops"].shape == (4, 3, G, G)


def test_crop_size_validation() -> None:
    with pytest.raises(ValueError, match=r"augment\.global_crops_size=30 .*multiple.* 28 or 35"):
        MultiCropCollator(patch_size=7, global_crops_size=30)
    with pytest.raises(ValueError, match=r"augment\.global_crops_size=28"):
        MultiCropCollator(PATCH, G)([({"global_crops": [torch.zeros(3, 21, 21)] * 2, "local_crops": []}, 0)])


def reference_masks_weight(masks: torch.Tensor) -> list[float]:
    weights = []
    for row in masks.tolist():
        count = sum(row)
        if count:
            weights += [1.0 / count] * count
    return weights


def reference_upperbound(num_images: int, ratio_min_max: tuple[float, float], probability: float) -> int:
    """Sum over masked images of int(N · upper edge of its stratum), in float32 as DINOv2's torch scalars."""
    n_masked = int(num_images * probability)
    edges = torch.linspace(*ratio_min_max, n_masked + 1).numpy()  # the strata are defined by torch.linspace
    return sum(int(np.float32(N) * edge) for edge in edges[1:])


@pytest.mark.parametrize(
    ("batch", "probability", "ratios"), [(8, 0.5, (0.1, 0.5)), (5, 0.3, (0.2, 0.6)), (3, 1.0, (0.1, 0.5))]
)
def test_masks_and_their_bookkeeping(batch: int, probability: float, ratios: tuple[float, float]) -> None:
    collator = MultiCropCollator(PATCH, G, mask_ratio_min_max=ratios, mask_sample_probability=probability, seed=1)
    n_images = 2 * batch
    n_masked = int(n_images * probability)
    edges = torch.linspace(*ratios, n_masked + 1).numpy()
    strata_caps = sorted((int(np.float32(N) * e) for e in edges[1:]), reverse=True)
    nonempty = []
    for _ in range(40):
        out = collator(make_samples(batch))
        masks = out["masks"]
        assert masks.shape == (n_images, N) and masks.dtype == torch.bool
        counts = masks.sum(1)
        # At most n_masked images are masked; the k-th largest count is within the k-th largest stratum cap.
        assert (counts > 0).sum() <= n_masked
        assert all(c <= cap for c, cap in zip(sorted(counts.tolist(), reverse=True), strata_caps, strict=False))
        assert out["upperbound"] == reference_upperbound(n_images, ratios, probability)
        assert counts.sum() <= out["upperbound"]
        assert out["mask_indices"].tolist() == [i for i, m in enumerate(masks.flatten().tolist()) if m]
        assert out["masks_weight"].tolist() == pytest.approx(reference_masks_weight(masks))
        assert out["n_masked_patches"].dtype == torch.long
        assert out["n_masked_patches"].tolist() == [int(counts.sum())]
        nonempty.append((counts > 0).reshape(2, batch).any(dim=1))
    # Shuffled over both global views, and the generator essentially never comes back empty-handed.
    assert torch.stack(nonempty).any(dim=0).all()


def test_masked_ratios_are_stratified_on_average() -> None:
    # 16 images, 8 masked: sorted ratios should sit near the midpoints of the 8 strata of [0.1, 0.5].
    collator = MultiCropCollator(patch_size=14, global_crops_size=224, seed=0)  # N = 256
    sorted_ratios = []
    for _ in range(30):
        masks = collator(make_samples_224(8))["masks"]
        ratios = sorted(masks.float().mean(1).tolist())
        assert ratios[:8] == [0.0] * 8
        sorted_ratios.append(ratios[8:])
    midpoints = 0.1 + 0.05 * (np.arange(8) + 0.5)
    np.testing.assert_allclose(np.mean(sorted_ratios, axis=0), midpoints, atol=0.02)


def make_samples_224(batch: int) -> list[tuple[dict, int]]:
    crop = torch.zeros(3, 224, 224)
    return [({"global_crops": [crop, crop], "local_crops": []}, 0) for _ in range(batch)]


def test_rng_is_seeded_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = make_samples(4)

    def masks_in(worker: SimpleNamespace | None, seed: int | None = 0) -> torch.Tensor:
        monkeypatch.setattr(collate_module.torch.utils.data, "get_worker_info", lambda: worker)
        collator = MultiCropCollator(PATCH, G, seed=seed)
        return torch.stack([collator(samples)["masks"] for _ in range(3)])

    main = masks_in(None)
    assert torch.equal(main, masks_in(None))
    w0, w1 = SimpleNamespace(id=0, seed=1234), SimpleNamespace(id=1, seed=1235)
    assert torch.equal(masks_in(w0), masks_in(w0))
    assert not torch.equal(masks_in(w0), masks_in(w1))
    assert not torch.equal(masks_in(w0), main)
    assert not torch.equal(masks_in(w0, seed=0), masks_in(w0, seed=1))


def test_rng_is_reseeded_when_the_collator_moves_to_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    collator = MultiCropCollator(PATCH, G, seed=0)
    collator(make_samples(2))  # creates the main-process RNG
    monkeypatch.setattr(collate_module.torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=0, seed=99))
    moved = collator(make_samples(2))["masks"]
    fresh = MultiCropCollator(PATCH, G, seed=0)(make_samples(2))["masks"]
    assert torch.equal(moved, fresh)


def test_dataloader_workers_are_reproducible_under_manual_seed() -> None:
    samples = make_samples(16)
    collator = MultiCropCollator(PATCH, G, seed=None)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        loader = DataLoader(samples, batch_size=4, num_workers=2, collate_fn=collator)
        return [batch["masks"] for batch in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # Batches 0 and 1 come from different workers, each with its first draw: different streams.
    assert not torch.equal(first[0], first[1])


def test_python_random_module_is_untouched() -> None:
    random.seed(5)
    before = random.random()
    random.seed(5)
    MultiCropCollator(PATCH, G, seed=0)(make_samples(4))
    assert random.random() == before

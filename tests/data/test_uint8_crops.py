"""``augment.crops_dtype=uint8``: crops leave the workers as uint8 and are normalised on the device."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import TINY, compose_config
from vitreg.config import ConfigError, validate_config
from vitreg.data.transforms import IMAGENET_STD, DeviceNormalize, MultiCropTransform
from vitreg.lit.data import crops_dtype, multicrop_transform
from vitreg.lit.module import DINOv2Module
from vitreg.lit.pretrain import pretrain


def image(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, 61, 83), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_uint8_crops_normalised_on_the_device_equal_host_normalised_crops_up_to_one_rounding():
    kwargs = dict(global_crops_size=28, local_crops_size=14, local_crops_number=3)
    host = MultiCropTransform(**kwargs)(image(), generator=torch.Generator().manual_seed(1))
    sent = MultiCropTransform(**kwargs, output_dtype=torch.uint8)(image(), generator=torch.Generator().manual_seed(1))
    normalise = DeviceNormalize()
    half_level = 0.5 / 255 / min(IMAGENET_STD) + 1e-6  # the one uint8 rounding, in normalised units
    for key in ("global_crops", "local_crops"):
        for a, b in zip(host[key], sent[key], strict=True):
            assert b.dtype == torch.uint8 and b.shape == a.shape
            assert (normalise(b) - a).abs().max().item() <= half_level


def test_float_crops_pass_the_device_normalisation_unchanged():
    crops = torch.randn(2, 3, 14, 14)
    assert DeviceNormalize()(crops) is crops


def test_module_normalises_uint8_batches_after_the_transfer():
    module = DINOv2Module(compose_config(TINY))
    crops = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    batch = module.on_after_batch_transfer({"global_crops": crops, "local_crops": None}, 0)
    assert batch["global_crops"].dtype == torch.float32 and batch["local_crops"] is None
    assert torch.allclose(batch["global_crops"], DeviceNormalize()(crops))
    assert "crop_normalize.mean" not in module.state_dict()  # nothing new in checkpoints


def test_auto_is_float32_without_cuda_and_the_choice_is_validated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert crops_dtype(compose_config(TINY)) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert crops_dtype(compose_config([*TINY, "trainer.accelerator=auto"])) == torch.uint8
    assert crops_dtype(compose_config([*TINY, "trainer.accelerator=cpu"])) == torch.float32
    assert multicrop_transform(compose_config([*TINY, "augment.crops_dtype=uint8"])).output_dtype == torch.uint8
    with pytest.raises(ConfigError, match=r"augment\.crops_dtype"):
        validate_config(compose_config([*TINY, "augment.crops_dtype=float16"]))


@pytest.mark.slow
def test_a_run_with_uint8_crops_trains(tmp_path):
    summary = pretrain(compose_config([*TINY, "trainer.max_steps=2", "augment.crops_dtype=uint8"], run_dir=tmp_path))
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])

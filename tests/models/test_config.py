"""Bad input fails early with a message that names the key, what was given and what would work."""

from __future__ import annotations

import pytest
import torch

from vitreg.models import ViTConfig, build_vit, vit_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"num_register_tokens": -1},
            r"model\.num_register_tokens: must be an integer >= 0 \(0 = no registers\), got -1",
        ),
        ({"img_size": 225}, r"model\.img_size: 225 is not a multiple of patch_size 14; try 224"),
        ({"ffn_layer": "geglu"}, r"model\.ffn_layer: must be one of \['mlp', 'swiglu'\], got 'geglu'"),
        ({"num_heads": 5}, r"model\.num_heads: embed_dim 192 is not divisible by num_heads 5"),
        ({"drop_path_rate": 1.0}, r"model\.drop_path_rate: must be in \[0, 1\), got 1\.0"),
        ({"patch_size": 0}, r"model\.patch_size: must be a positive integer, got 0"),
        ({"interpolate_offset": -0.1}, r"model\.interpolate_offset: must be >= 0"),
        ({"layerscale_init": 0.0}, r"model\.layerscale_init: must be > 0 or None"),
    ],
)
def test_invalid_configs_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        vit_config("vitt", **overrides)


def test_unknown_model_name_lists_the_sizes():
    with pytest.raises(ValueError, match=r"unknown model 'vit_huge'; known sizes: vitt, vits, vitb, vitl, vitg"):
        build_vit("vit_huge")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown backbone option\(s\) \['registers'\]; valid options: \["):
        build_vit("vitt", registers=4)


def test_config_and_keywords_are_not_mixed():
    with pytest.raises(ValueError, match="not both"):
        build_vit(ViTConfig(), depth=2)


@pytest.fixture(scope="module")
def model():
    return build_vit("vitt", depth=1, img_size=56, num_register_tokens=2).eval()


def test_image_sides_not_divisible_by_patch(model):
    with pytest.raises(ValueError, match=r"multiples of patch_size 14, got 100x98; nearest valid size: 98x98"):
        model.forward_features(torch.randn(1, 3, 100, 98))


def test_wrong_channels_and_rank(model):
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 1"):
        model.forward_features(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, C, H, W\), got \(3, 56, 56\)"):
        model.forward_features(torch.randn(3, 56, 56))


@pytest.mark.parametrize(
    "masks",
    [torch.zeros(2, 15, dtype=torch.bool), torch.zeros(1, 16, dtype=torch.bool), torch.zeros(2, 16)],
)
def test_masks_of_wrong_shape_or_dtype(model, masks):
    with pytest.raises(ValueError, match=r"masks must be a bool tensor of shape \(B, num_patches\) = \(2, 16\)"):
        model.forward_features(torch.randn(2, 3, 56, 56), masks=masks)


def test_interpolation_defaults_follow_registers_and_can_be_pinned():
    assert (vit_config("vitt").antialias, vit_config("vitt").offset) == (False, 0.1)
    reg = vit_config("vitt", num_register_tokens=4)
    assert (reg.antialias, reg.offset) == (True, 0.0)
    pinned = vit_config("vitt", interpolate_antialias=True, interpolate_offset=0.0)
    assert (pinned.antialias, pinned.offset) == (True, 0.0)

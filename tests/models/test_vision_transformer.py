"""Backbone behaviour: token layout, registers, masking, multi-crop list forward, outputs, sizes."""

from __future__ import annotations

import pytest
import torch

from tests.models.reference import official_state_dict, reference_forward
from vitreg.models import VIT_SIZES, build_vit, load_dinov2_backbone, vit_config
from vitreg.models.layers import swiglu_hidden_dim


def tiny(**overrides):
    kwargs = {"depth": 2, "img_size": 56, "num_register_tokens": 4} | overrides
    return build_vit("vitt", **kwargs).eval()


# ------------------------------------------------------------------ reference forward
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dim", [64, 128])  # 1 and 2 heads of DINOv2's 64 dims
def test_forward_matches_naive_reference(registers, ffn, masked, dim):
    sd = official_state_dict(dim=dim, depth=2, grid=4, registers=registers, ffn=ffn, hidden=96)
    model = load_dinov2_backbone(sd).eval()
    assert model.cfg.num_heads == dim // 64
    x = torch.randn(3, 3, 56, 56)
    masks = torch.rand(3, 16) < 0.5 if masked else None
    with torch.no_grad():
        out = model.forward_features(x, masks=masks)
    expected = reference_forward(sd, x, heads=dim // 64, pos_embed=sd["pos_embed"], masks=masks)
    torch.testing.assert_close(out["x_prenorm"].double(), expected, atol=1e-5, rtol=1e-5)


def test_forward_matches_reference_at_another_resolution():
    sd = official_state_dict(dim=64, depth=1, grid=4, registers=2)
    model = load_dinov2_backbone(sd).eval()
    x = torch.randn(2, 3, 42, 70)  # 3x5 patches: interpolated, non-square
    with torch.no_grad():
        pos = model.interpolate_pos_encoding((3, 5), torch.float32)
        out = model.forward_features(x)["x_prenorm"]
    torch.testing.assert_close(out.double(), reference_forward(sd, x, 1, pos), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ layout and registers
def test_token_layout_and_output_keys():
    model = tiny()
    out = model.forward_features(torch.randn(2, 3, 56, 56))
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_prenorm"].shape == (2, 1 + 4 + 16, 192)
    assert out["x_norm_clstoken"].shape == (2, 192)
    assert out["x_norm_regtokens"].shape == (2, 4, 192)
    assert out["x_norm_patchtokens"].shape == (2, 16, 192)
    normed = model.norm(out["x_prenorm"])
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0])
    torch.testing.assert_close(out["x_norm_regtokens"], normed[:, 1:5])
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 5:])


def test_zero_registers_gives_empty_register_output():
    out = tiny(num_register_tokens=0).forward_features(torch.randn(2, 3, 56, 56))
    assert out["x_norm_regtokens"].shape == (2, 0, 192)
    assert out["x_prenorm"].shape == (2, 17, 192)


def test_registers_get_no_positional_embedding():
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    tokens = model.prepare_tokens_with_masks(x)
    # registers are the raw parameters, identical for every image
    torch.testing.assert_close(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))
    # CLS and patches do carry the table: changing it moves them, never the registers
    with torch.no_grad():
        model.pos_embed.add_(1.0)
    moved = model.prepare_tokens_with_masks(x)
    torch.testing.assert_close(moved[:, 1:5], tokens[:, 1:5])
    torch.testing.assert_close(moved[:, 0], tokens[:, 0] + 1.0)
    torch.testing.assert_close(moved[:, 5:], tokens[:, 5:] + 1.0)
    assert model.pos_embed.shape == (1, 1 + 16, 192)  # the table covers CLS + patches only


def test_register_pos_embed_switch_for_ablations():
    model = tiny(register_pos_embed=True)
    assert model.register_pos_embed.shape == (1, 4, 192)
    tokens = model.prepare_tokens_with_masks(torch.randn(1, 3, 56, 56))
    torch.testing.assert_close(tokens[0, 1:5], (model.register_tokens + model.register_pos_embed)[0])


def test_init_follows_dinov2():
    torch.manual_seed(0)
    model = build_vit("vits", depth=2, num_register_tokens=4)
    assert model.cls_token.std() < 1e-5 and model.register_tokens.std() < 1e-5
    assert not torch.equal(model.register_tokens[0, 0], model.register_tokens[0, 1])  # symmetry broken
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.mask_token) == 0
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002 and torch.count_nonzero(qkv.bias) == 0
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    assert torch.all(model.blocks[0].norm1.weight == 1) and model.norm.eps == 1e-6
    # the patch-embedding conv keeps PyTorch's default (kaiming-uniform, non-zero bias)
    bound = 1 / (3 * 14 * 14) ** 0.5
    assert model.patch_embed.proj.weight.abs().max() <= bound and model.patch_embed.proj.bias.abs().sum() > 0


# ------------------------------------------------------------------ masking
def test_masked_patches_are_replaced_by_mask_token_before_pos_embed():
    model = tiny()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = masks[1, 7] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    pos = model.pos_embed[0, 1:]
    torch.testing.assert_close(tokens[0, 5 + 3], model.mask_token[0] + pos[3])
    torch.testing.assert_close(tokens[1, 5 + 7], model.mask_token[0] + pos[7])
    plain = model.prepare_tokens_with_masks(x)
    keep = ~masks
    torch.testing.assert_close(tokens[:, 5:][keep], plain[:, 5:][keep])
    assert model.forward_features(x, masks)["masks"] is masks


# ------------------------------------------------------------------ multi-crop list forward
def test_list_forward_equals_separate_forwards():
    torch.manual_seed(0)
    model = build_vit("vitt", depth=3, num_register_tokens=4).eval()
    globals_ = torch.randn(4, 3, 224, 224)
    locals_ = torch.randn(16, 3, 98, 98)
    masks = torch.rand(4, 256) < 0.3
    with torch.no_grad():
        joint = model.forward_features([globals_, locals_], masks=[masks, None])
        alone = [model.forward_features(globals_, masks), model.forward_features(locals_)]
    assert len(joint) == 2
    for j, a in zip(joint, alone, strict=True):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(j[key], a[key], atol=1e-5, rtol=1e-5)
    assert joint[0]["masks"] is masks and joint[1]["masks"] is None


def test_list_forward_trains_with_drop_path():
    model = build_vit("vitt", depth=2, img_size=56, drop_path_rate=0.4, num_register_tokens=2).train()
    outs = model.forward_features([torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)])
    loss = sum(o["x_norm_clstoken"].square().mean() for o in outs)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks.parameters())


def test_list_forward_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="2 image batches but 1 masks"):
        tiny().forward_features([torch.randn(1, 3, 56, 56), torch.randn(1, 3, 28, 28)], masks=[None])


# ------------------------------------------------------------------ intermediate layers and attention
def test_get_intermediate_layers_like_dinov2():
    model = build_vit("vitt", depth=4, img_size=56, num_register_tokens=4).eval()
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        last2 = model.get_intermediate_layers(x, n=2)
        picked = model.get_intermediate_layers(x, n=[0, -1], return_class_token=True, return_register_tokens=True)
        spatial = model.get_intermediate_layers(x, n=1, reshape=True, norm=False)
        final = model.forward_features(x)
    assert len(last2) == 2 and last2[-1].shape == (2, 20, 192)
    torch.testing.assert_close(last2[-1], final["x_norm_patchtokens"])  # registers are stripped
    patches, cls, regs = picked[1]
    torch.testing.assert_close(cls, final["x_norm_clstoken"])
    torch.testing.assert_close(regs, final["x_norm_regtokens"])
    torch.testing.assert_close(patches, final["x_norm_patchtokens"])
    assert spatial[0].shape == (2, 192, 4, 5)
    torch.testing.assert_close(spatial[0].flatten(2).transpose(1, 2), final["x_prenorm"][:, 5:])


def test_get_intermediate_layers_rejects_bad_indices():
    model = tiny()
    with pytest.raises(ValueError, match=r"last 1\.\.2 blocks"):
        model.get_intermediate_layers(torch.randn(1, 3, 56, 56), n=3)
    with pytest.raises(ValueError, match=r"n=5 is out of range for a 2-block model; use 0\.\.1 or -1\.\.-2"):
        model.get_intermediate_layers(torch.randn(1, 3, 56, 56), n=[5])


def test_attention_maps_are_probabilities_and_forward_is_unchanged():
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    maps = model.get_attention_maps(x, blocks=[0, -1])
    assert set(maps) == {0, 1}
    assert maps[1].shape == (2, 3, 21, 21)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 3, 21))
    # the maps are computed beside the forward: the tokens are exactly the configured kernel's
    direct = model.get_intermediate_layers(x, n=1, norm=False, return_class_token=True)[0]
    inspected = model.forward_intermediates(x, 1, attention=True, qkv=True)[1]
    assert torch.equal(model.layout.patches(inspected.tokens), direct[0])
    assert torch.equal(inspected.attention, maps[1])


def test_forward_returns_cls_unless_training():
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(model(x), model.forward_features(x)["x_norm_clstoken"])
    assert isinstance(model(x, is_training=True), dict)


# ------------------------------------------------------------------ sizes
def _expected_params(dim: int, depth: int, hidden: int, swiglu: bool, grid: int, patch: int, regs: int) -> int:
    """Parameter count written from the official architecture (dinov2/models/vision_transformer.py)."""
    embed = dim * 3 * patch * patch + dim + dim + (1 + grid * grid) * dim + regs * dim + dim  # +cls +mask
    ffn = (dim * 2 * hidden + 2 * hidden + hidden * dim + dim) if swiglu else (2 * dim * hidden + hidden + dim)
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + ffn
    return embed + depth * block + 2 * dim


@pytest.mark.parametrize("name", list(VIT_SIZES))
@pytest.mark.parametrize("registers", [0, 4])
def test_every_size_builds_with_dinov2_parameter_count(name, registers):
    with torch.device("meta"):  # no memory, no init cost: vitg has 1.1B parameters
        model = build_vit(name, img_size=518, num_register_tokens=registers)
    cfg = vit_config(name)
    n_params = sum(p.numel() for p in model.parameters())
    swiglu = cfg.ffn_layer == "swiglu"
    hidden = swiglu_hidden_dim(4 * cfg.embed_dim) if swiglu else 4 * cfg.embed_dim
    assert n_params == _expected_params(cfg.embed_dim, cfg.depth, hidden, swiglu, 37, 14, registers)
    # DINOv2's four sizes counted by hand @518 px, no heads: 22.06M / 86.58M / 304.37M / 1136.48M
    published = {"vits": 22.06e6, "vitb": 86.58e6, "vitl": 304.37e6, "vitg": 1136.48e6}
    if name in published and registers == 0:
        assert abs(n_params - published[name]) < 0.01e6


def test_vitl_swiglu_uses_dinov2_hidden_rule():
    with torch.device("meta"):
        model = build_vit("vitl", ffn_layer="swiglu")
    assert model.blocks[0].mlp.w12.weight.shape == (2 * 2736, 1024)
    assert swiglu_hidden_dim(4 * 1536) == 4096


def test_any_patch_size():
    model = build_vit("vitt", depth=1, patch_size=16, img_size=64, num_register_tokens=1).eval()
    out = model.forward_features(torch.randn(1, 3, 64, 48))
    assert out["x_norm_patchtokens"].shape == (1, 12, 192)


def test_linear_drop_path_schedule():
    cfg = vit_config("vitt", depth=4, drop_path_rate=0.3, drop_path_uniform=False)
    assert cfg.drop_path_rates() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert vit_config("vitt", depth=4, drop_path_rate=0.3).drop_path_rates() == [0.3] * 4


def test_register_init_std_sets_the_spread_of_the_registers():
    torch.manual_seed(0)
    dinov2 = build_vit("vitt", num_register_tokens=16)
    torch.manual_seed(0)
    dinov3 = build_vit("vitt", num_register_tokens=16, register_init_std=0.02)
    assert float(dinov2.register_tokens.std()) == pytest.approx(1e-6, rel=0.1)
    assert float(dinov3.register_tokens.std()) == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="register_init_std"):
        build_vit("vitt", num_register_tokens=4, register_init_std=0.0)

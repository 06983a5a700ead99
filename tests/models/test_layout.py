"""The backbone's inspection API: token layout, block indices, layer-by-layer outputs."""

from __future__ import annotations

import pytest
import torch

from vitreg.models import TokenLayout, build_vit


def model(registers: int = 3, depth: int = 3, drop_path_rate: float = 0.0):
    torch.manual_seed(0)
    vit = build_vit(
        "vitt", depth=depth, num_register_tokens=registers, img_size=28, drop_path_rate=drop_path_rate
    ).eval()
    for p in vit.parameters():  # away from the init so every token differs
        p.data.add_(torch.randn_like(p) * 0.05)
    return vit


@pytest.mark.parametrize("registers", [0, 1, 4])
def test_layout_splits_cls_registers_and_patches(registers):
    layout = TokenLayout(registers)
    tokens = torch.arange(2 * (1 + registers + 6) * 3).reshape(2, 1 + registers + 6, 3)
    cls, regs, patches = layout.split(tokens)
    assert torch.equal(cls, tokens[:, 0])
    assert torch.equal(regs, tokens[:, 1 : 1 + registers])
    assert torch.equal(patches, tokens[:, 1 + registers :])
    assert torch.equal(layout.prefix(tokens), tokens[:, : 1 + registers])
    assert torch.equal(tokens[:, layout.patches_slice], patches)
    assert torch.equal(tokens[:, layout.registers_slice], regs)
    probs = torch.rand(2, 3, 1 + registers + 6, 1 + registers + 6)  # (B, H, query, key)
    assert torch.equal(layout.registers(probs, dim=-1), probs[..., 1 : 1 + registers])
    assert torch.equal(layout.cls(probs, dim=2), probs[:, :, 0])


def test_the_model_reports_its_layout():
    vit = model(registers=4)
    assert vit.layout == TokenLayout(4)
    assert vit.num_prefix_tokens == 5


def test_iter_layers_is_the_forward_layer_by_layer():
    vit, x = model(), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        layers = list(vit.iter_layers(x))
        out = vit.forward_features(x)
    assert [layer.index for layer in layers] == [0, 1, 2, 3]
    assert torch.equal(layers[0].tokens, vit.prepare_tokens_with_masks(x))
    assert torch.equal(layers[-1].tokens, out["x_prenorm"])
    assert all(layer.attention is None and layer.qkv is None for layer in layers)
    with torch.no_grad():
        assert [layer.index for layer in vit.iter_layers(x, upto=1)] == [0, 1]


def test_forward_intermediates_adds_attention_and_qkv_without_changing_the_tokens():
    vit, x = model(), torch.randn(2, 3, 28, 28)
    seen = {}
    handle = vit.blocks[1].attn.qkv.register_forward_hook(lambda _m, _a, out: seen.setdefault("qkv", out))
    with torch.no_grad():
        plain = vit.forward_intermediates(x, [1, -1])
        inspected = vit.forward_intermediates(x, [1, -1], attention=True, qkv=[1])
    handle.remove()
    assert list(inspected) == [1, 2]
    for i in (1, 2):
        assert torch.equal(inspected[i].tokens, plain[i].tokens)
        assert inspected[i].attention.shape == (2, 3, 1 + 3 + 4, 1 + 3 + 4)
        torch.testing.assert_close(inspected[i].attention.sum(-1), torch.ones(2, 3, 8))
    assert inspected[2].qkv is None
    # the qkv the block itself projected in the forward (packed rows), split as DINOv2 splits it
    assert torch.equal(inspected[1].qkv, seen["qkv"].view(2, 8, 3, vit.embed_dim))
    with torch.no_grad():
        normed = vit.forward_intermediates(x, 1, norm=True)[2].tokens
        assert torch.equal(vit.layout.patches(normed), vit.forward_features(x)["x_norm_patchtokens"])


def test_block_indices_resolve_once_with_the_setting_named():
    vit = model(depth=3)
    assert [vit.resolve_block(i) for i in (0, 2, -1, -3)] == [0, 2, 2, 0]
    assert vit.resolve_blocks(2) == [1, 2]
    assert vit.resolve_blocks([0, -1]) == [0, 2]
    with pytest.raises(ValueError, match=r"lost\.layers=3 is out of range for a 3-block model; use 0\.\.2 or -1\.\.-3"):
        vit.resolve_block(3, "lost.layers")
    with pytest.raises(ValueError, match="layer=True"):
        vit.resolve_block(True)
    with pytest.raises(ValueError, match=r"n=4: can take the last 1\.\.3 blocks"):
        vit.resolve_blocks(4, "n")


def test_embed_patches_is_the_patch_embedding_before_positions():
    vit, x = model(), torch.randn(2, 3, 28, 28)
    assert torch.equal(vit.embed_patches(x), vit.patch_embed(x))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        vit.embed_patches(torch.randn(1, 3, 30, 30))


def test_without_stochastic_depth_turns_every_block_off():
    vit = model(drop_path_rate=0.4).train()
    assert all(block.drop_path > 0 for block in vit.blocks)
    assert vit.without_stochastic_depth() is vit
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x)["x_prenorm"], vit.eval().forward_features(x)["x_prenorm"])


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_iter_layers_reports_the_ffn_neurons_as_the_forward_computes_them(ffn):
    torch.manual_seed(0)
    vit = build_vit("vitt", depth=2, num_register_tokens=2, img_size=28, ffn_layer=ffn).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        layers = list(vit.iter_layers(x, mlp=[1]))
        block = vit.blocks[1]
        tokens = layers[1].tokens
        mid = tokens + block.ls1(block.attn(block.norm1(tokens)))
        h = block.norm2(mid)
        if ffn == "mlp":
            expected = block.mlp.act(block.mlp.fc1(h))
        else:
            x1, x2 = block.mlp.w12(h).chunk(2, dim=-1)
            expected = torch.nn.functional.silu(x1) * x2
    assert layers[1].mlp_hidden is None and layers[2].mlp_hidden.shape == (
        2,
        1 + 2 + 4,
        block.mlp.output_proj.in_features,
    )
    torch.testing.assert_close(layers[2].mlp_hidden, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(layers[2].tokens, vit.forward_features(x)["x_prenorm"])  # the forward is unchanged
    assert not block.mlp.output_proj._forward_pre_hooks  # nothing left attached

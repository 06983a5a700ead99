"""Hugging Face interop, checked with the real ``transformers``: an exported folder loads with no missing or
unexpected keys and gives the vitreg backbone's CLS, register and patch tokens, at the native size, smaller
and larger ones and a non-square one; HF folders (also ones HF wrote itself) read back exactly.

Bitwise equal with the MLP FFN. With SwiGLU, transformers 5.x splits the fused ``weights_in`` into two
matmuls (``gate_proj``, ``up_proj``), which round differently from one: a few fp32 ulps (measured up to
8.6e-7 on tokens of magnitude ~4), so those cases are compared within 1e-6 + 1e-6 relative."""

from __future__ import annotations

import json

import pytest
import torch

from vitreg.models import build_vit, load_dinov2_backbone
from vitreg.models.export import export_backbone
from vitreg.models.export_hf import (
    HF_PLAIN,
    HF_REGISTERS,
    ExportError,
    hf_config,
    hub_state_dict_from_hf,
    save_hf_folder,
)

transformers = pytest.importorskip("transformers")

P = 14
SIZES = [(56, 56), (42, 42), (84, 84), (42, 70)]  # native 4x4 grid, smaller, larger, non-square


def random_model(**overrides) -> torch.nn.Module:
    """A tiny backbone with every tensor randomised (LayerScale far from its init, nonzero biases)."""
    kwargs = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": P, "img_size": 56, **overrides}
    model = build_vit("vitt", **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def vitreg_tokens(model, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


def assert_same_tokens(actual: torch.Tensor, expected: torch.Tensor, swiglu: bool, where: object = None) -> None:
    if swiglu:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where}: {m}")
    else:
        assert torch.equal(actual, expected), (where, (actual - expected).abs().max().item())


def settings(cfg) -> tuple:
    """What defines the function a backbone computes, beyond its tensors."""
    return cfg.num_heads, cfg.antialias, cfg.offset, cfg.layerscale_init is None, cfg.ffn_layer, cfg.hidden_dim


def load_hf(folder):
    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    return model.eval()


CASES = {
    "reg4": {"num_register_tokens": 4},
    "reg4_no_layerscale": {"num_register_tokens": 4, "layerscale_init": None},
    "reg4_swiglu": {"num_register_tokens": 4, "ffn_layer": "swiglu"},
    "reg0_exact_size_path": {"interpolate_antialias": False, "interpolate_offset": 0.0},
    "reg0_antialias_swiglu_no_layerscale": {
        "ffn_layer": "swiglu",
        "layerscale_init": None,
        "interpolate_antialias": True,
        "interpolate_offset": 0.0,
    },
    "reg2_no_qkv_bias_3_heads": {"num_register_tokens": 2, "qkv_bias": False, "embed_dim": 96, "num_heads": 3},
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(CASES))
def test_hf_folder_gives_the_same_tokens_at_every_size(case, tmp_path):
    model = random_model(**CASES[case])
    result = export_backbone(model, "hf", tmp_path / "hf")
    assert result.warnings == [] and result.record["exact_at"] == "every image size"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
        "vitreg_export.json",
    ]
    hf = load_hf(tmp_path / "hf")
    expected = HF_REGISTERS if model.cfg.num_register_tokens or model.cfg.antialias else HF_PLAIN
    assert type(hf).__name__ == expected
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w, generator=g)
        swiglu = model.cfg.ffn_layer == "swiglu"
        assert_same_tokens(hf(pixel_values=x).last_hidden_state, vitreg_tokens(model, x), swiglu, (case, h, w))
    # and back: the folder (with its vitreg_export.json) reads as the model that was exported
    again = load_dinov2_backbone(tmp_path / "hf")
    assert settings(again.cfg) == settings(model.cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


@torch.no_grad()
def test_legacy_interpolation_without_registers_is_exact_at_the_native_size_only_and_warns(tmp_path):
    model = random_model()  # 0 registers: DINOv2's convention, antialias off and offset 0.1
    assert (model.cfg.antialias, model.cfg.offset) == (False, 0.1)
    result = export_backbone(model, "hf", tmp_path / "hf")
    assert len(result.warnings) == 1 and "interpolate_offset=0.1" in result.warnings[0]
    assert result.record["exact_at"] == "the native image size only"
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == HF_PLAIN
    x = torch.randn(1, 3, 56, 56)
    assert torch.equal(hf(pixel_values=x).last_hidden_state, vitreg_tokens(model, x))
    x = torch.randn(1, 3, 84, 84)
    assert not torch.equal(hf(pixel_values=x).last_hidden_state, vitreg_tokens(model, x))


@torch.no_grad()
def test_without_the_record_the_folder_reads_with_hfs_own_conventions(tmp_path):
    """A folder from elsewhere: LayerScale ones are kept, interpolation is the HF class's; outputs equal HF's."""
    model = random_model(num_register_tokens=4, layerscale_init=None, ffn_layer="swiglu")
    save_hf_folder(model, tmp_path)
    again = load_dinov2_backbone(tmp_path)
    assert again.cfg.layerscale_init == 1.0 and again.cfg.num_heads == 2
    hf = load_hf(tmp_path)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w)
        assert_same_tokens(vitreg_tokens(again, x), hf(pixel_values=x).last_hidden_state, True, (h, w))


@torch.no_grad()
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("swiglu", [False, True])
def test_folders_written_by_transformers_read_exactly(registers, swiglu, tmp_path):
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, use_swiglu_ffn=swiglu)
        cls = transformers.Dinov2WithRegistersModel
    else:
        config = transformers.Dinov2Config(use_swiglu_ffn=swiglu)
        cls = transformers.Dinov2Model
    config.update({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56})
    config.update({"patch_size": P, "layerscale_value": 0.5})
    torch.manual_seed(0)
    hf = cls(config).eval()
    for p in hf.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    model = load_dinov2_backbone(tmp_path)
    live = load_dinov2_backbone(hub_state_dict_from_hf(hf.state_dict()), num_heads=4, **_interp(registers))
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w)
        expected = hf(pixel_values=x).last_hidden_state
        assert_same_tokens(vitreg_tokens(model, x), expected, swiglu, (h, w))
        assert_same_tokens(vitreg_tokens(live, x), expected, swiglu, (h, w))  # a 5.x model's own key names too


def _interp(registers: int) -> dict:
    return {"interpolate_antialias": bool(registers), "interpolate_offset": 0.0}


def test_config_json_holds_what_hf_needs(tmp_path):
    model = random_model(num_register_tokens=4, ffn_layer="swiglu", layerscale_init=None)
    save_hf_folder(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [HF_REGISTERS] and config["model_type"] == "dinov2_with_registers"
    assert (config["use_swiglu_ffn"], config["mlp_ratio"], config["num_register_tokens"]) == (True, 4, 4)
    assert (config["num_attention_heads"], config["image_size"], config["patch_size"]) == (2, 56, P)


def test_what_hf_cannot_hold_is_refused():
    with pytest.raises(ExportError, match="register positional embeddings"):
        hf_config(random_model(num_register_tokens=2, register_pos_embed=True).cfg)
    with pytest.raises(ExportError, match="no integer mlp_ratio"):
        hf_config(random_model(ffn_hidden_dim=100).cfg)

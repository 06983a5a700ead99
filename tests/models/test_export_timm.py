"""timm interop without timm (it needs torchvision, which must never be installed next to vitreg).

The exported file is checked against timm's conventions as written in ``timm/models/vision_transformer.py``
and ``timm/layers/{mlp,attention,pos_embed,layer_scale,norm}.py`` (huggingface/pytorch-image-models at
aa4b5850c154, timm 1.0.29.dev0), re-stated here independently:

- the keys and shapes ``VisionTransformer(**kwargs)`` registers (``timm_shapes``), so timm's strict
  ``load_state_dict`` finds no missing or unexpected key;
- the file passes through timm's ``checkpoint_filter_fn`` untouched: no ``mask_token`` (which routes a file
  to the DINOv2 converter), no top-level ``model`` / ``state_dict`` / ``encoder`` key, ``pos_embed`` already
  at the model's grid;
- ``timm_forward`` computes what timm's forward does with those tensors (``_pos_embed`` with and without
  ``no_embed_class``, ``resample_abs_pos_embed``: bicubic, antialias, exact size, skipped for an unchanged
  square grid; fused-qkv SDPA attention; ``GluMlp`` gate-first SwiGLU; LayerNorm eps 1e-6), and its tokens
  are compared bitwise with vitreg's;
- the printed ``timm.create_model`` line: a registered name, no None keyword (``create_model`` prunes them),
  ``init_values=0`` without LayerScale, and an ``mlp_ratio`` giving the exact ``fc1`` width.
"""

from __future__ import annotations

import ast
import re

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_export_hf import random_model
from vitreg.models import load_dinov2_backbone
from vitreg.models.export import export_backbone
from vitreg.models.export_hf import ExportError, load_safetensors
from vitreg.models.export_timm import hub_state_dict_from_timm, timm_create_line, timm_kwargs, timm_state_dict

P = 14
SIZES = [(56, 56), (42, 42), (84, 84), (42, 70)]
# the DINOv2 entry points of timm/models/vision_transformer.py
TIMM_DINOV2_NAMES = {f"vit_{s}_patch14{r}_dinov2" for s in ("small", "base", "large", "giant") for r in ("", "_reg4")}


def timm_shapes(kw: dict) -> dict[str, tuple[int, ...]]:
    """The parameters timm's VisionTransformer(**kw) registers (class token on, 'token' pool, no head)."""
    d, regs, grid = kw["embed_dim"], kw["reg_tokens"], kw["img_size"] // kw["patch_size"]
    glu = "mlp_layer" in kw
    fc1 = int(d * kw["mlp_ratio"])
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, grid * grid + (0 if kw["no_embed_class"] else 1 + regs), d)}
    if regs:
        shapes["reg_token"] = (1, regs, d)
    shapes["patch_embed.proj.weight"] = (d, kw.get("in_chans", 3), kw["patch_size"], kw["patch_size"])
    shapes["patch_embed.proj.bias"] = (d,)
    for i in range(kw["depth"]):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d)}
        if kw["qkv_bias"]:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
        shapes |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)}
        shapes |= {b + "norm2.weight": (d,), b + "norm2.bias": (d,)}
        shapes |= {b + "mlp.fc1.weight": (fc1, d), b + "mlp.fc1.bias": (fc1,)}
        shapes |= {b + "mlp.fc2.weight": (d, fc1 // 2 if glu else fc1), b + "mlp.fc2.bias": (d,)}
        if kw["init_values"]:
            shapes |= {b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)}
    shapes |= {"norm.weight": (d,), "norm.bias": (d,)}
    return shapes


def timm_forward(sd: dict, kw: dict, x: torch.Tensor) -> torch.Tensor:
    """timm's forward_features for a DINOv2-style ViT, from its tensors (tokens after the final norm)."""
    d, p, heads = kw["embed_dim"], kw["patch_size"], kw["num_heads"]
    prefix = 1 + kw["reg_tokens"]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    b, _, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)
    pos, keep, grid = sd["pos_embed"], 0 if kw["no_embed_class"] else prefix, kw["img_size"] // p
    if not (h * w + keep == pos.shape[1] and h == w):  # resample_abs_pos_embed
        table = pos[:, keep:].float().reshape(1, grid, grid, d).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(h, w), mode="bicubic", antialias=True)
        pos = torch.cat([pos[:, :keep], table.permute(0, 2, 3, 1).reshape(1, h * w, d)], 1)
    tokens = [sd["cls_token"].expand(b, -1, -1)] + ([sd["reg_token"].expand(b, -1, -1)] if kw["reg_tokens"] else [])
    t = torch.cat([*tokens, t + pos], 1) if kw["no_embed_class"] else torch.cat([*tokens, t], 1) + pos
    n = t.shape[1]
    for i in range(kw["depth"]):
        g = lambda name, i=i: sd.get(f"blocks.{i}.{name}")  # noqa: E731
        y = F.layer_norm(t, (d,), g("norm1.weight"), g("norm1.bias"), 1e-6)
        q, k, v = (
            F.linear(y, g("attn.qkv.weight"), g("attn.qkv.bias")).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        )
        y = F.linear(
            F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d),
            g("attn.proj.weight"),
            g("attn.proj.bias"),
        )
        t = t + (y * g("ls1.gamma") if kw["init_values"] else y)
        y = F.linear(
            F.layer_norm(t, (d,), g("norm2.weight"), g("norm2.bias"), 1e-6), g("mlp.fc1.weight"), g("mlp.fc1.bias")
        )
        if "mlp_layer" in kw:
            gate, value = y.chunk(2, dim=-1)  # GluMlp(gate_last=False): act on the first half
            y = F.silu(gate) * value
        else:
            y = F.gelu(y)
        y = F.linear(y, g("mlp.fc2.weight"), g("mlp.fc2.bias"))
        t = t + (y * g("ls2.gamma") if kw["init_values"] else y)
    return F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)  # fmt: skip


def vitreg_tokens(model, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


def parse_create_line(line: str) -> tuple[str, dict]:
    """(model name, keyword arguments as source text or literal values) of the printed call."""
    call = ast.parse(line).body[0].value
    assert ast.unparse(call.func) == "timm.create_model"
    kwargs = {}
    for kw in call.keywords:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            kwargs[kw.arg] = ast.unparse(kw.value)
    return call.args[0].value, kwargs


CASES = {
    "reg4": {"num_register_tokens": 4},
    "reg4_swiglu_no_layerscale": {"num_register_tokens": 4, "ffn_layer": "swiglu", "layerscale_init": None},
    "reg0_antialias": {"interpolate_antialias": True, "interpolate_offset": 0.0},
    "reg1_no_qkv_bias_3_heads": {"num_register_tokens": 1, "qkv_bias": False, "embed_dim": 96, "num_heads": 3},
    "reg0_swiglu_antialias": {"ffn_layer": "swiglu", "interpolate_antialias": True, "interpolate_offset": 0.0},
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(CASES))
def test_timm_file_follows_timms_layout_and_gives_the_same_tokens(case, tmp_path):
    model = random_model(**CASES[case])
    path = tmp_path / "m.safetensors"
    result = export_backbone(model, "timm", path)
    assert result.warnings == []
    sd = load_safetensors(path)
    name, kw = parse_create_line(result.usage)
    assert name in TIMM_DINOV2_NAMES and bool(kw["reg_tokens"]) == ("reg4" in name)
    assert kw["pretrained_cfg_overlay"] == f"dict(file={str(path.resolve())!r})" and kw["pretrained"] is True
    assert None not in kw.values() and kw["dynamic_img_size"] is True and kw["num_classes"] == 0
    if model.cfg.ffn_layer == "swiglu":
        assert (kw["mlp_layer"], kw["act_layer"]) == ("timm.layers.SwiGLUPacked", "torch.nn.SiLU")
    assert kw["init_values"] == (0 if model.cfg.layerscale_init is None else 1e-5)
    # what timm's strict load and checkpoint_filter_fn would see
    assert {k: tuple(v.shape) for k, v in sd.items()} == timm_shapes(kw)
    assert not {"mask_token", "model", "state_dict", "encoder"} & set(sd)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        assert torch.equal(timm_forward(sd, kw, x), vitreg_tokens(model, x)), (case, h, w)
    # and back into vitreg, with and without the export record
    x = torch.randn(1, 3, 42, 70)
    assert torch.equal(vitreg_tokens(load_dinov2_backbone(path), x), vitreg_tokens(model, x))
    (tmp_path / "vitreg_export.json").unlink()  # a file from elsewhere: timm's interpolation, heads given
    again = load_dinov2_backbone(path, num_heads=model.cfg.num_heads)
    assert torch.equal(vitreg_tokens(again, x), vitreg_tokens(model, x))


def test_register_models_fold_the_cls_position_like_timms_dinov2_converter():
    model = random_model(num_register_tokens=4)
    sd, hub = timm_state_dict(model), model.state_dict()
    assert torch.equal(sd["cls_token"], hub["cls_token"] + hub["pos_embed"][:, :1])
    assert torch.equal(sd["pos_embed"], hub["pos_embed"][:, 1:]) and torch.equal(
        sd["reg_token"], hub["register_tokens"]
    )
    plain = random_model()
    assert torch.equal(timm_state_dict(plain)["pos_embed"], plain.state_dict()["pos_embed"])  # CLS entry kept


def test_the_printed_line_is_exact_python(tmp_path):
    line = timm_create_line(random_model(ffn_layer="swiglu", layerscale_init=None).cfg, tmp_path / "m.safetensors")
    ast.parse(line)
    assert re.search(r"init_values=0, .*mlp_layer=timm\.layers\.SwiGLUPacked, act_layer=torch\.nn\.SiLU", line)
    assert "mlp_ratio=5.5" in line  # fc1 = 2 x 176 = 352 = int(64 x 5.5), timm's GluMlp halves it


def test_mlp_ratio_gives_the_exact_fc1_width():
    for dim, hidden in ((1536, 4096), (384, 1024), (64, 176), (1000, 2667)):
        cfg = random_model(ffn_layer="swiglu").cfg
        cfg.embed_dim, cfg.ffn_hidden_dim = dim, hidden
        assert int(dim * timm_kwargs(cfg)["mlp_ratio"]) == 2 * hidden


@torch.no_grad()
def test_legacy_interpolation_without_registers_warns(tmp_path):
    result = export_backbone(random_model(), "timm", tmp_path / "m.safetensors")
    assert len(result.warnings) == 1 and "timm uses antialias=True" in result.warnings[0]


def test_timm_models_with_parts_dinov2_lacks_are_refused(tmp_path):
    sd = timm_state_dict(random_model(num_register_tokens=4))
    with pytest.raises(ValueError, match=r"head\.weight"):
        hub_state_dict_from_timm({**sd, "head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)})
    with pytest.raises(ExportError, match="register positional embeddings"):
        timm_kwargs(random_model(num_register_tokens=2, register_pos_embed=True).cfg)
    with pytest.raises(ValueError, match=r"writes a \.safetensors file"):
        export_backbone(random_model(), "timm", tmp_path / "model.pth")

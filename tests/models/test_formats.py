"""One reader for every backbone source: HF folders, timm state dicts (.safetensors or .pth) and DINOv2 files
load through ``load_dinov2_backbone`` and ``load_backbone``; anything else is refused with a guess of what it
is and how to convert a vitreg run."""

from __future__ import annotations

import json

import pytest
import torch

from tests.models.reference import official_state_dict
from vitreg.models import build_vit, load_dinov2_backbone
from vitreg.models.export import export_backbone
from vitreg.models.export_hf import hf_state_dict, save_hf_folder
from vitreg.models.export_timm import timm_state_dict
from vitreg.models.formats import read_backbone_source
from vitreg.models.load import load_backbone


def tiny(**overrides):
    torch.manual_seed(0)
    return build_vit("vitt", embed_dim=64, depth=2, num_heads=1, img_size=28, **overrides).eval()


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_every_format_reads_back_through_both_loaders(tmp_path):
    model = tiny(num_register_tokens=2)
    written = {
        "dinov2": export_backbone(model, "dinov2", tmp_path / "m.pth").path,
        "hf": export_backbone(model, "hf", tmp_path / "hf").path,
        "timm": export_backbone(model, "timm", tmp_path / "m.safetensors").path,
    }
    for fmt, path in written.items():
        assert read_backbone_source(path).format == fmt
        loaded = load_backbone(path)
        assert loaded.source == fmt and loaded.model.cfg.num_heads == 1  # from vitreg_export.json
        if fmt != "timm":  # timm's CLS carries its position: same outputs, other tensors
            assert same_weights(load_dinov2_backbone(path), model)


def test_timm_and_hf_state_dicts_as_plain_files(tmp_path):
    model = tiny(num_register_tokens=4, layerscale_init=None)
    torch.save(timm_state_dict(model), tmp_path / "timm.pth")
    torch.save({"state_dict": timm_state_dict(model)}, tmp_path / "timm_train.pth")  # a timm training file
    torch.save(hf_state_dict(model), tmp_path / "hf.bin")
    x = torch.randn(1, 3, 42, 28)
    expected = model.forward_features(x)["x_prenorm"]
    for name, fmt in (("timm.pth", "timm"), ("timm_train.pth", "timm"), ("hf.bin", "hf")):
        assert read_backbone_source(tmp_path / name).format == fmt
        again = load_dinov2_backbone(tmp_path / name, num_heads=1)
        assert torch.equal(again.forward_features(x)["x_prenorm"], expected), name


@pytest.mark.parametrize(
    ("keys", "guess"),
    [
        ({"storage_tokens": 1, "rope_embed.periods": 1, "blocks.0.attn.qkv.weight": 1}, "DINOv3"),
        ({"visual.class_embedding": 1, "text_projection": 1}, "CLIP"),
        ({"state_dict": {"model.fc.weight": 1}, "optimizer_states": [], "pytorch-lightning_version": "2"}, "Lightning"),
        ({"teacher": {"dino_head.mlp.0.weight": 1}}, "heads only"),
        ({"stem.conv.weight": 1, "stages.0.blocks.0.weight": 1}, "convolutional"),
        ({"vit.encoder.layer.0.attention.attention.query.weight": 1}, "Hugging Face ViT that is not Dinov2"),
        ({"fc.weight": 1}, "nothing vitreg knows"),
    ],
)
def test_refusals_say_what_the_file_looks_like_and_how_to_convert(keys, guess, tmp_path):
    def tensors(d):
        return {k: tensors(v) if isinstance(v, dict) else torch.zeros(1) if v == 1 else v for k, v in d.items()}

    torch.save(tensors(keys), tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a DINOv2 backbone checkpoint") as err:
        load_dinov2_backbone(tmp_path / "x.pth")
    assert guess in str(err.value) and "scripts/export_backbone.py SOURCE --format dinov2|hf|timm" in str(err.value)


def test_directories_that_are_not_sources_are_explained(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="vitreg run directory: pass one checkpoint"):
        load_dinov2_backbone(tmp_path / "run")
    hf = tmp_path / "hf"
    save_hf_folder(tiny(), hf)
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="never unpickles: re-save it with"):
        load_dinov2_backbone(hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'vit'"):
        load_dinov2_backbone(hf)


def test_a_dinov2_file_in_a_folder_of_exports_keeps_its_own_settings(tmp_path):
    """vitreg_export.json entries are per file: an official file beside exports is read as before."""
    export_backbone(tiny(num_register_tokens=1), "dinov2", tmp_path / "ours.pth")
    torch.save(official_state_dict(dim=128, registers=4), tmp_path / "official.pth")
    assert load_dinov2_backbone(tmp_path / "official.pth").cfg.num_heads == 2  # width / 64
    assert load_dinov2_backbone(tmp_path / "ours.pth").cfg.num_heads == 1  # from the record

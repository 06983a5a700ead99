"""Official DINOv2 checkpoint interop: every layout loads strictly, exports back identically, and
anything that does not fit fails with the list of keys."""

from __future__ import annotations

import pickle
import re

import pytest
import torch

from tests.models.reference import official_state_dict
from vitreg.models import (
    CheckpointMismatchError,
    build_vit,
    export_dinov2_state_dict,
    infer_vit_config,
    load_backbone_weights,
    load_dinov2_backbone,
    save_dinov2_checkpoint,
)


def chunked(sd: dict, depth: int, chunks: int) -> dict:
    """Rename hub keys to DINOv2's block_chunks layout, written from the spec: blocks.<chunk>.<i>."""
    size = depth // chunks
    return {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // size}.{m[1]}.", k): v for k, v in sd.items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ inference
@pytest.mark.parametrize(
    ("registers", "ffn", "hidden"),
    [(0, "mlp", 256), (4, "mlp", 256), (4, "swiglu", 176), (1, "swiglu", 100)],
)
def test_infers_architecture_from_tensors(registers, ffn, hidden):
    sd = official_state_dict(dim=64, depth=3, patch=14, grid=37, registers=registers, ffn=ffn, hidden=hidden)
    cfg = infer_vit_config(sd)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (64, 3, 1, 14)
    assert cfg.img_size == 518 and cfg.grid_size == 37  # hub files store a 37x37 table
    assert cfg.num_register_tokens == registers and cfg.ffn_layer == ffn and cfg.hidden_dim == hidden
    assert cfg.layerscale_init is not None
    # DINOv2's interpolation conventions: register models antialias + exact size, others offset 0.1
    assert (cfg.antialias, cfg.offset) == ((True, 0.0) if registers else (False, 0.1))


def test_infers_named_size_and_no_layerscale():
    sd = official_state_dict(dim=384, depth=1, grid=2, layerscale=False)
    cfg = infer_vit_config(sd, depth=1)
    assert cfg.num_heads == 6 and cfg.layerscale_init is None and cfg.hidden_dim == 1536
    model = load_dinov2_backbone(sd)
    assert isinstance(model.blocks[0].ls1, torch.nn.Identity)


def test_heads_must_be_given_when_not_64_dim():
    sd = official_state_dict(dim=96, depth=1, grid=2)
    with pytest.raises(ValueError, match="not a multiple of 64: pass num_heads="):
        infer_vit_config(sd)
    assert load_dinov2_backbone(sd, num_heads=3).cfg.num_heads == 3


# ------------------------------------------------------------------ round trips per layout
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_hub_layout_loads_strictly_and_exports_identically(registers, ffn):
    sd = official_state_dict(dim=64, depth=2, grid=4, registers=registers, ffn=ffn, hidden=128)
    model = load_dinov2_backbone(sd)
    assert_same_state(export_dinov2_state_dict(model, "hub"), sd)


def test_chunked_layout_loads_and_exports_identically():
    sd = official_state_dict(dim=64, depth=8, grid=4, registers=4)
    training = chunked(sd, depth=8, chunks=4)
    assert "blocks.1.2.attn.qkv.weight" in training and "blocks.3.7.norm2.bias" in training
    model = load_dinov2_backbone(training)
    assert_same_state(export_dinov2_state_dict(model, "hub"), sd)
    assert_same_state(export_dinov2_state_dict(model, "chunked", block_chunks=4), training)


def test_teacher_dump_loads_and_exports_backbone():
    sd = official_state_dict(dim=64, depth=2, grid=4, registers=4)
    dump = {"teacher": {f"backbone.{k}": v for k, v in sd.items()}}
    dump["teacher"]["dino_head.mlp.0.weight"] = torch.randn(8, 64)
    model = load_dinov2_backbone(dump)
    exported = export_dinov2_state_dict(model, "teacher")
    assert set(exported) == {"teacher"}
    assert_same_state(exported["teacher"], {k: v for k, v in dump["teacher"].items() if k.startswith("backbone.")})


def test_trainer_checkpoint_picks_teacher_or_student():
    teacher = official_state_dict(dim=64, depth=2, grid=4, seed=1)
    student = official_state_dict(dim=64, depth=2, grid=4, seed=2)
    trainer_file = {
        "model": {
            **{f"student.backbone.{k}": v for k, v in chunked(student, 2, 2).items()},
            **{f"teacher.backbone.{k}": v for k, v in chunked(teacher, 2, 2).items()},
            "teacher.dino_head.last_layer.weight_g": torch.ones(8, 1),
        },
        "iteration": 1000,
    }
    assert_same_state(export_dinov2_state_dict(load_dinov2_backbone(trainer_file)), teacher)
    assert_same_state(export_dinov2_state_dict(load_dinov2_backbone(trainer_file, which="student")), student)


def test_wrapper_prefixes_are_removed():
    sd = official_state_dict(dim=64, depth=2, grid=4)
    wrapped = {
        "module."
        + k.replace("blocks.", "blocks._fsdp_wrapped_module.").replace(".attn.", "._checkpoint_wrapped_module.attn."): v
        for k, v in sd.items()
    }
    assert_same_state(export_dinov2_state_dict(load_dinov2_backbone(wrapped)), sd)


def test_file_round_trip_is_atomic_and_weights_only(tmp_path):
    model = build_vit("vitt", depth=2, img_size=56, num_register_tokens=4).eval()
    path = tmp_path / "backbone.pth"
    save_dinov2_checkpoint(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.pth"]  # no temporary files left
    loaded = load_dinov2_backbone(path).eval()
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(loaded(x), model(x))
    for layout in ("chunked", "teacher"):
        save_dinov2_checkpoint(model, tmp_path / f"{layout}.pth", layout=layout, block_chunks=2)
        torch.testing.assert_close(load_dinov2_backbone(tmp_path / f"{layout}.pth").eval()(x), model(x))


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = build_vit("vitt", depth=1, img_size=28)
    path = tmp_path / "backbone.pth"
    save_dinov2_checkpoint(model, path)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("vitreg.utils.io.torch.save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_dinov2_checkpoint(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.pth"]


class Payload:
    """Pickling this would run code on load; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("executed",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_files_with_pickled_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": Payload()}, f)
    with pytest.raises(ValueError, match="never unpickles code"):
        load_dinov2_backbone(path)


# ------------------------------------------------------------------ mismatches
def test_checkpoint_of_another_architecture_lists_wrong_shapes():
    vits = official_state_dict(dim=384, depth=2, grid=16, registers=4)
    model = build_vit("vitb", depth=2, num_register_tokens=4)
    with pytest.raises(CheckpointMismatchError) as err:
        load_backbone_weights(model, vits)
    message = str(err.value)
    assert "does not fit the model (ViT(D=768, depth=2, heads=12)/14" in message and "wrong shapes" in message
    assert "cls_token: checkpoint (1, 1, 384) vs model (1, 1, 768)" in message
    assert "looks like: ViT(D=384, depth=2, heads=6)/14 with 4 registers" in message


def test_missing_and_unexpected_keys_are_listed():
    sd = official_state_dict(dim=64, depth=2, grid=4, registers=4)
    model = load_dinov2_backbone(sd)
    broken = dict(sd)
    del broken["blocks.1.attn.proj.bias"]
    broken["blocks.1.attn.rope.freqs"] = torch.zeros(4)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"(?s)missing keys \(1\).*blocks\.1\.attn\.proj\.bias.*"
        r"unexpected keys \(1\).*blocks\.1\.attn\.rope\.freqs",
    ):
        load_backbone_weights(model, broken)


def test_register_count_contradicting_the_checkpoint_fails():
    sd = official_state_dict(dim=64, depth=1, grid=4, registers=4)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\):\s+register_tokens"):
        load_dinov2_backbone(sd, num_register_tokens=0)


def test_not_a_backbone_is_refused():
    with pytest.raises(ValueError, match=r"not a DINOv2 backbone checkpoint: no \['cls_token'"):
        load_dinov2_backbone({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="expected a state dict"):
        load_dinov2_backbone([torch.zeros(1)])


def test_export_refuses_what_dinov2_cannot_hold():
    model = build_vit("vitt", depth=2, img_size=28, num_register_tokens=2, register_pos_embed=True)
    with pytest.raises(ValueError, match="register positional embeddings"):
        export_dinov2_state_dict(model)
    plain = build_vit("vitt", depth=2, img_size=28)
    with pytest.raises(ValueError, match=r"block_chunks must be in 1\.\.2"):
        export_dinov2_state_dict(plain, "chunked", block_chunks=3)
    with pytest.raises(ValueError, match="layout must be one of"):
        export_dinov2_state_dict(plain, "timm")

"""PatchDrop, clean-vs-occluded feature correlation and attention faithfulness on constructed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitreg.data.transforms import normalize
from vitreg.eval.occlusion import (
    attended_cells,
    attention_faithfulness,
    attention_scores,
    cells_to_drop,
    cosine,
    drop_cells,
    feature_correlation,
    fill_values,
    patch_attention,
    patch_drop,
    pearson,
    plot_occlusion,
)
from vitreg.models.vision_transformer import build_vit

IMG = 56  # 4 x 4 patches of 14 px


def tiny_vit(registers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_vit("vitt", num_register_tokens=registers, img_size=IMG, patch_size=14, layerscale_init=None).eval()


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.randn(n, 3, 7, 7, generator=g), size=IMG, mode="bilinear")


@torch.no_grad()
def make_identity_blocks(model) -> None:
    """Every block adds zero: CLS and registers never see the patches."""
    for blk in model.blocks:
        for layer in (blk.attn.proj, blk.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()


# ------------------------------------------------------------------------------------------ PatchDrop


def test_cells_to_drop_rounds_half_up():
    assert cells_to_drop(0.0, 196) == 0
    assert cells_to_drop(0.3, 196) == 59  # 58.8
    assert cells_to_drop(0.25, 10) == 3  # 2.5 -> 3
    assert cells_to_drop(1.0, 16) == 16
    with pytest.raises(ValueError, match="fraction"):
        cells_to_drop(1.5, 16)


@pytest.mark.parametrize(("fraction", "cell"), [(0.25, 14), (0.5, 7), (0.75, (14, 28)), (0.3, 8)])
def test_patch_drop_fills_exactly_the_chosen_whole_cells(fraction, cell):
    images = torch.randn(5, 3, IMG, IMG)
    out, dropped = patch_drop(images, fraction, cell, torch.Generator().manual_seed(0), fill="mean")
    ch, cw = (cell, cell) if isinstance(cell, int) else cell
    gh, gw = IMG // ch, IMG // cw
    assert dropped.shape == (5, gh, gw)
    assert (dropped.reshape(5, -1).sum(1) == cells_to_drop(fraction, gh * gw)).all()
    expected_pixels = dropped.repeat_interleave(ch, 1).repeat_interleave(cw, 2)[:, None].expand_as(images)
    changed = out != images
    assert torch.equal(changed, expected_pixels)  # every pixel of a dropped cell, nothing else
    assert (out[expected_pixels] == 0).all()
    assert torch.equal(images, images.clone())  # the input is untouched


def test_patch_drop_draws_differ_per_image_and_are_seeded():
    images = torch.randn(8, 3, IMG, IMG)
    _, a = patch_drop(images, 0.5, 14, torch.Generator().manual_seed(1))
    _, b = patch_drop(images, 0.5, 14, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1


def test_fill_values_black_is_a_zero_pixel_after_normalisation():
    black = normalize(torch.zeros(3, 1, 1))[:, 0, 0]
    torch.testing.assert_close(fill_values("black"), black)
    assert torch.equal(fill_values("mean"), torch.zeros(3))
    assert fill_values(0.5).tolist() == [0.5] * 3
    images = torch.randn(1, 3, 28, 28)
    cells = torch.tensor([[True, False, False, False]])
    out = drop_cells(images, cells, 14)
    torch.testing.assert_close(out[0, :, :14, :14], black[:, None, None].expand(3, 14, 14))
    with pytest.raises(ValueError, match="fill"):
        fill_values("grey")


def test_patch_drop_with_explicit_cells_and_bad_sizes():
    images = torch.randn(2, 3, 28, 28)
    cells = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    out, dropped = patch_drop(images, None, 14, cells=cells, fill=1.0)
    assert torch.equal(dropped, cells)
    assert (out[0, :, :14, :14] == 1).all() and torch.equal(out[0, :, 14:], images[0, :, 14:])
    with pytest.raises(ValueError, match="divide"):
        patch_drop(images, 0.5, 5)
    with pytest.raises(ValueError, match="fraction"):
        patch_drop(images, None, 14)


# ------------------------------------------------------------------------------------------ correlation


def test_pearson_and_cosine_match_numpy_and_are_exactly_one_on_identical_rows():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, 192, generator=g), torch.randn(50, 192, generator=g)
    ref = [np.corrcoef(x, y)[0, 1] for x, y in zip(a.double().numpy(), (a + b).double().numpy(), strict=True)]
    np.testing.assert_allclose(pearson(a, a + b).numpy(), ref, atol=1e-12)
    a64, b64 = a.double().numpy(), (a - b).double().numpy()
    ref_cos = (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)
    np.testing.assert_allclose(cosine(a, a - b).numpy(), ref_cos, atol=1e-12)
    scaled = 100 * torch.randn(1000, 192, generator=g)
    assert (pearson(scaled, scaled) == 1.0).all()
    assert (cosine(scaled, scaled) == 1.0).all()


def test_no_information_loss_gives_correlation_exactly_one():
    model = tiny_vit()
    res = feature_correlation(model, smooth_images(4), fractions=(0.0,))
    entry = res["by_fraction"]["0"]
    assert entry["num_dropped"] == 0
    for kind in ("cls", "registers", "patches"):
        assert entry[kind] == [1.0] * 12
    assert entry["final_cls"] == 1.0 and entry["final_cls_cosine"] == 1.0
    json.dumps(res)


def test_cls_that_never_sees_patches_keeps_correlation_one():
    model = tiny_vit(registers=2)
    make_identity_blocks(model)
    res = feature_correlation(model, smooth_images(4), fractions=(0.25, 0.75), seed=3)
    for entry in res["by_fraction"].values():
        assert entry["cls"] == [1.0] * 12 and entry["registers"] == [1.0] * 12
        assert entry["final_cls"] == 1.0
        assert max(entry["patches"]) < 0.99  # the patches themselves did change


def test_correlation_decreases_with_information_loss_at_every_layer():
    model = tiny_vit(registers=2)
    res = feature_correlation(model, smooth_images(16), fractions=(0.25, 0.5, 0.75), repeats=2)
    by = res["by_fraction"]
    assert res["layers"] == list(range(1, 13)) and res["num_cells"] == 16
    assert [by[f]["num_dropped"] for f in ("0.25", "0.5", "0.75")] == [4, 8, 12]
    for kind in ("cls", "registers", "patches"):
        for layer in range(12):
            assert by["0.25"][kind][layer] > by["0.5"][kind][layer] > by["0.75"][kind][layer]
    assert by["0.25"]["final_cls"] > by["0.5"]["final_cls"] > by["0.75"]["final_cls"]


def test_model_without_registers_reports_none_for_them():
    res = feature_correlation(tiny_vit(registers=0), smooth_images(2), fractions=(0.5,), cell_size=7)
    assert res["by_fraction"]["0.5"]["registers"] is None
    assert res["num_cells"] == 64 and res["cell_size"] == [7, 7]


# ------------------------------------------------------------------------------------------ faithfulness


def constructed_attention(
    batch: int, registers: int, patch_scores: torch.Tensor, heads: int = 3, reverse_head0: bool = False
) -> torch.Tensor:
    """(B, heads, T, T) probabilities whose CLS row puts most mass (0.6) on registers, 0.05 on itself
    and 0.35 on patches proportional to ``patch_scores`` (B, P), reversed in head 0 if asked."""
    p = patch_scores.shape[1]
    t = 1 + registers + p
    probs = torch.full((batch, heads, t, t), 1.0 / t)
    row = torch.zeros(batch, heads, t)
    row[:, :, 0] = 0.05
    row[:, :, 1 : 1 + registers] = 0.6 / max(registers, 1)
    patches = patch_scores / patch_scores.sum(1, keepdim=True)
    row[:, :, 1 + registers :] = 0.35 * patches[:, None]
    if reverse_head0:
        row[:, 0, 1 + registers :] = 0.35 * patches.flip(1)
    probs[:, :, 0] = row
    return probs


def test_patch_attention_excludes_cls_and_registers_and_renormalises():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0]])
    probs = constructed_attention(2, registers=2, patch_scores=scores, heads=1)
    got = patch_attention(probs, num_prefix=3)
    torch.testing.assert_close(got, (scores / scores.sum(1, keepdim=True)).double())
    three_heads = constructed_attention(2, registers=2, patch_scores=scores, reverse_head0=True)
    torch.testing.assert_close(patch_attention(three_heads, 3, head=0), (scores.flip(1) / 10).double())
    torch.testing.assert_close(patch_attention(three_heads, 3, head=1), (scores / 10).double())
    torch.testing.assert_close(patch_attention(three_heads, 3), ((2 * scores + scores.flip(1)) / 30).double())
    with pytest.raises(ValueError, match="head"):
        patch_attention(three_heads, 3, head=3)


def test_attended_cells_are_exactly_the_top_and_bottom_patches():
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0, 0.5, 0.25, 0.15]])
    most, least = attended_cells(scores, 0.25)  # 2 of 8
    assert most[0].nonzero().flatten().tolist() == [1, 5]
    assert least[0].nonzero().flatten().tolist() == [0, 4]
    most, least = attended_cells(scores, 0.0)
    assert not most.any() and not least.any()


def test_faithfulness_drops_exactly_the_ranked_patches_and_never_registers(monkeypatch):
    """Plant the attention maps, record every occluded image the model sees, and read back which
    cells were blacked out: the most/least sets must be exactly the planted top/bottom patches."""
    model = tiny_vit(registers=2)
    images = smooth_images(2)
    scores = torch.stack([torch.arange(16.0) + 1, torch.arange(16.0).flip(0) + 1])
    probs = constructed_attention(2, registers=2, patch_scores=scores)
    monkeypatch.setattr(model, "get_attention_maps", lambda x, blocks=-1: {11: probs})
    torch.testing.assert_close(attention_scores(model, images), (scores / scores.sum(1, keepdim=True)).double())

    seen = []
    forward = model.forward_features

    def recording_forward(x, masks=None):
        seen.append(x.clone())
        return forward(x, masks)

    monkeypatch.setattr(model, "forward_features", recording_forward)
    res = attention_faithfulness(model, images, fractions=(0.25,), repeats=1)
    black = fill_values("black").view(1, 3, 1, 1)
    dropped_sets = []
    for x in seen[1:]:  # seen[0] is the clean pass
        cells = (x == black).all(1).reshape(2, 4, 14, 4, 14).all(4).all(2).reshape(2, 16)
        dropped_sets.append([row.nonzero().flatten().tolist() for row in cells])
    assert dropped_sets[0] == [[12, 13, 14, 15], [0, 1, 2, 3]]  # most attended
    assert dropped_sets[1] == [[0, 1, 2, 3], [12, 13, 14, 15]]  # least attended
    assert all(len(cells) == 4 for cells in dropped_sets[2])  # random
    entry = res["by_fraction"]["0.25"]
    assert entry["num_dropped"] == 4
    assert entry["most"]["attention_mass"] == pytest.approx((13 + 14 + 15 + 16) / 136)
    assert entry["least"]["attention_mass"] == pytest.approx((1 + 2 + 3 + 4) / 136)
    assert res["register_attention"] == pytest.approx(0.6)
    assert res["cls_self_attention"] == pytest.approx(0.05)


def test_faithfulness_is_one_everywhere_when_cls_never_sees_patches():
    model = tiny_vit(registers=4)
    make_identity_blocks(model)
    res = attention_faithfulness(model, smooth_images(3), fractions=(0.25, 0.5), repeats=2)
    for entry in res["by_fraction"].values():
        for mode in ("most", "least", "random"):
            assert entry[mode]["correlation"] == 1.0 and entry[mode]["cosine"] == 1.0
        assert entry["gap"] == 0.0


def test_faithfulness_runs_on_a_real_model_and_plots(tmp_path):
    model = tiny_vit(registers=4)
    res = attention_faithfulness(model, smooth_images(4), fractions=(0.25, 1.0), head=1)
    quarter, full = res["by_fraction"]["0.25"], res["by_fraction"]["1"]
    assert quarter["most"]["attention_mass"] >= quarter["random"]["attention_mass"] - 0.05
    assert quarter["most"]["attention_mass"] > quarter["least"]["attention_mass"]
    assert full["most"]["attention_mass"] == pytest.approx(1.0) and full["num_dropped"] == 16
    assert res["head"] == 1 and res["layer"] == 11 and res["register_attention"] > 0
    json.dumps(res)
    corr = feature_correlation(model, smooth_images(2), fractions=(0.25, 0.5))
    path = plot_occlusion([corr, res], tmp_path / "occlusion.png")
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="expected"):
        plot_occlusion({"probe": "other"}, tmp_path / "bad.png")

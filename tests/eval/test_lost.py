"""LOST on constructed features and on a ViT whose keys are built to make the answer unambiguous."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitreg.eval.boxes import BoxedImage, ObjectBox
from vitreg.eval.lost import (
    capture_features,
    connected_components,
    discover,
    evaluate_lost,
    lost,
    patch_box_to_pixels,
    plot_lost_examples,
    prepare_image,
    sweep_lost,
    token_features,
)
from vitreg.models.vision_transformer import build_vit


# ---------------------------------------------------------------- constructed features
def grid_features(h: int, w: int, objects: list[tuple[int, int, int, int]], bg, obj, noise: float = 0.0, seed=0):
    """(h*w, C) features: ``bg`` everywhere, ``obj`` inside the patch boxes (r0, c0, r1, c1)."""
    bg, obj = torch.as_tensor(bg, dtype=torch.float32), torch.as_tensor(obj, dtype=torch.float32)
    feats = bg.repeat(h, w, 1)
    for r0, c0, r1, c1 in objects:
        feats[r0:r1, c0:c1] = obj
    g = torch.Generator().manual_seed(seed)
    return (feats + noise * torch.randn(feats.shape, generator=g)).reshape(h * w, -1)


E = torch.eye(4)


def test_object_block_is_found_exactly():
    # Background shares e0; the 3x4 object a direction with negative overlap (-0.3) with it: object
    # patches have the lowest degree (11 < 107), the seed is inside, M > 0 exactly on the object.
    feats = grid_features(10, 12, [(4, 6, 7, 10)], bg=E[0], obj=E[1] - 0.3 * E[0], noise=0.02)
    result = lost(feats, (10, 12))
    assert result.box_patches == (4, 6, 7, 10)
    r, c = result.seed_rc
    assert 4 <= r < 7 and 6 <= c < 10 and result.seed == r * 12 + c
    assert not result.fallback
    expected = torch.zeros(10, 12, dtype=torch.bool)
    expected[4:7, 6:10] = True
    assert torch.equal(result.mask, expected)
    assert sorted(set(result.degree.tolist())) == [11, 107]


def test_box_covers_only_the_seed_blob():
    # Two disconnected blobs with the same feature: all object patches tie on degree, the stable order
    # picks the first in raster order, which is in the *smaller* blob; the box must stay on it.
    feats = grid_features(10, 12, [(1, 1, 3, 3), (5, 6, 8, 9)], bg=E[0], obj=E[1] - 0.3 * E[0])
    result = lost(feats, (10, 12))
    assert result.seed_rc == (1, 1)
    assert result.box_patches == (1, 1, 3, 3)
    # with noise the seed may land in either blob; the box is always the seed's blob
    blobs = [(1, 1, 3, 3), (5, 6, 8, 9)]
    for seed in range(5):
        noisy = grid_features(10, 12, blobs, bg=E[0], obj=E[1] - 0.3 * E[0], noise=0.02, seed=seed)
        result = lost(noisy, (10, 12))
        r, c = result.seed_rc
        [blob] = [b for b in blobs if b[0] <= r < b[2] and b[1] <= c < b[3]]
        assert result.box_patches == blob


def test_gram_bias_moves_the_threshold():
    # bg = e0 + 0.1 e2, obj = e1 + 0.1 e2: within-group products 1.01, across 0.01.
    feats = grid_features(10, 12, [(4, 6, 7, 10)], bg=E[0] + 0.1 * E[2], obj=E[1] + 0.1 * E[2])
    # bias 0: every product is positive, all degrees tie at 119, seed = patch 0 (background),
    # M > 0 everywhere -> the whole grid (IoU with the object 12/120: wrong)
    wrong = lost(feats, (10, 12), gram_bias=0.0)
    assert (wrong.seed, wrong.box_patches) == (0, (0, 0, 10, 12))
    # bias -0.1: within 0.91 > 0, across -0.09 < 0 -> the object, exactly
    right = lost(feats, (10, 12), gram_bias=-0.1)
    assert right.box_patches == (4, 6, 7, 10) and not right.fallback
    # bias -2: nothing is positive, the seed has no similars -> fallback to the seed patch (0, 0)
    none = lost(feats, (10, 12), gram_bias=-2.0)
    assert none.fallback and none.seed == 0 and none.box_patches == (0, 0, 1, 1)
    assert none.mask.sum() == 1


def test_centering_removes_a_shared_offset():
    # A large common component 5 e2 makes every product positive; centring removes it (the centred
    # bg and object features are b(e0 - e1) and a(e1 - e0): negative across), L2 alone does not.
    feats = grid_features(10, 12, [(4, 6, 7, 10)], bg=E[0] + 5 * E[2], obj=E[1] + 5 * E[2])
    whole, obj = (0, 0, 10, 12), (4, 6, 7, 10)
    assert lost(feats, (10, 12), normalize="none").box_patches == whole
    assert lost(feats, (10, 12), normalize="l2").box_patches == whole
    assert lost(feats, (10, 12), normalize="center").box_patches == obj
    assert lost(feats, (10, 12), normalize="center_l2").box_patches == obj


def test_l2_normalisation_with_a_bias():
    # Faint background (norm 0.1) with bias -0.5: unnormalised, bg-bg products are 0.01 - 0.5 < 0, so
    # background patches have degree 0, the seed is background and has no similar patch (fallback).
    # With L2 rows the products are 0.5 within groups and -0.5 across: the object is found.
    feats = grid_features(10, 12, [(4, 6, 7, 10)], bg=0.1 * E[0], obj=E[1])
    raw = lost(feats, (10, 12), gram_bias=-0.5)
    assert raw.fallback and raw.box_patches == (0, 0, 1, 1)
    assert lost(feats, (10, 12), normalize="l2", gram_bias=-0.5).box_patches == (4, 6, 7, 10)


def reference_lost(feats: torch.Tensor, h: int, w: int, k: int, bias: float):
    """LOST written straight from the steps, in Python lists (exact on integer features)."""
    f = feats.tolist()
    n = len(f)
    a = [[sum(x * y for x, y in zip(f[i], f[j], strict=True)) + bias for j in range(n)] for i in range(n)]
    degree = [sum(1 for j in range(n) if j != i and a[i][j] > 0) for i in range(n)]
    order = sorted(range(n), key=lambda i: degree[i])  # stable: ties by index
    seed = order[0]
    similars = [p for p in order[:k] if a[seed][p] > 0]
    m = [sum(a[s][j] for s in similars) for j in range(n)]
    comp, frontier = set(), [seed] if m[seed] > 0 else []
    while frontier:
        i = frontier.pop()
        if i in comp:
            continue
        comp.add(i)
        r, c = divmod(i, w)
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < h and 0 <= cc < w and m[rr * w + cc] > 0:
                frontier.append(rr * w + cc)
    fallback = not comp
    comp = comp or {seed}
    rows, cols = [i // w for i in comp], [i % w for i in comp]
    return seed, (min(rows), min(cols), max(rows) + 1, max(cols) + 1), fallback, degree


@pytest.mark.parametrize("case", range(12))
def test_matches_reference_on_random_features(case):
    g = torch.Generator().manual_seed(case)
    h, w = 5 + case % 3, 6 + case % 4
    feats = torch.randint(-3, 4, (h * w, 5), generator=g).float()
    k = [3, 10, 100][case % 3]
    bias = [0.0, -2.0, 3.0, -6.0][case % 4]
    seed, box, fallback, degree = reference_lost(feats, h, w, k, bias)
    result = lost(feats, (h, w), k_patches=k, gram_bias=bias)
    assert (result.seed, result.box_patches, result.fallback) == (seed, box, fallback)
    assert result.degree.tolist() == degree


def test_lost_input_errors():
    feats = torch.randn(12, 4)
    with pytest.raises(ValueError, match="does not match a 3x5 grid"):
        lost(feats, (3, 5))
    with pytest.raises(ValueError, match="normalize must be one of"):
        lost(feats, (3, 4), normalize="zscore")
    with pytest.raises(ValueError, match="k_patches must be >= 1"):
        lost(feats, (3, 4), k_patches=0)


# ---------------------------------------------------------------- connected components
def flood_fill_reference(mask: list[list[bool]]):
    """Components by repeated growth from each unvisited cell; labels in raster order."""
    h, w = len(mask), len(mask[0])
    labels = [[0] * w for _ in range(h)]
    count = 0
    for r in range(h):
        for c in range(w):
            if mask[r][c] and not labels[r][c]:
                count += 1
                comp = {(r, c)}
                while True:
                    grown = comp | {
                        (y, x)
                        for (py, px) in comp
                        for (y, x) in ((py - 1, px), (py + 1, px), (py, px - 1), (py, px + 1))
                        if 0 <= y < h and 0 <= x < w and mask[y][x]
                    }
                    if grown == comp:
                        break
                    comp = grown
                for y, x in comp:
                    labels[y][x] = count
    return labels, count


@pytest.mark.parametrize("seed", range(8))
def test_connected_components_match_flood_fill(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = 3 + seed, 4 + 2 * seed
    mask = torch.rand(h, w, generator=g) < [0.3, 0.5, 0.7][seed % 3]
    labels, count = connected_components(mask)
    ref_labels, ref_count = flood_fill_reference(mask.tolist())
    assert count == ref_count
    assert labels.tolist() == ref_labels


def test_connected_components_use_four_connectivity():
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    labels, count = connected_components(mask)
    assert count == 3  # the diagonal neighbours are separate
    assert labels.tolist() == [[1, 0, 2], [0, 3, 0], [3, 3, 0]]


# ---------------------------------------------------------------- input preparation
def test_prepare_image_pads_without_resizing():
    img = torch.full((3, 45, 61), 128, dtype=torch.uint8)
    prepared = prepare_image(img, 8)
    assert prepared.tensor.shape == (3, 48, 64) and prepared.image_hw == (45, 61)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (128 / 255 - mean) / std
    assert torch.allclose(prepared.tensor[:, :45, :61], expected[:, None, None].expand(3, 45, 61))
    assert prepared.tensor[:, 45:].abs().max() == 0 and prepared.tensor[:, :, 61:].abs().max() == 0
    normalised = torch.randn(3, 16, 16)  # a float image is taken as already normalised
    assert torch.equal(prepare_image(normalised, 8).tensor, normalised)


def test_prepare_image_max_side_and_errors():
    prepared = prepare_image(torch.zeros(3, 100, 200, dtype=torch.uint8), 8, max_side=64)
    assert prepared.image_hw == (32, 64) and prepared.original_hw == (100, 200)
    assert prepared.tensor.shape == (3, 32, 64)
    assert prepare_image(torch.zeros(3, 40, 50, dtype=torch.uint8), 8, max_side=64).image_hw == (40, 50)
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        prepare_image(torch.zeros(1, 3, 8, 8), 8)


def test_patch_box_is_clipped_to_the_unpadded_image():
    assert patch_box_to_pixels((3, 5, 6, 8), 8, (45, 61)) == (40.0, 24.0, 61.0, 45.0)
    assert patch_box_to_pixels((0, 0, 1, 2), 8, (45, 61)) == (0.0, 0.0, 16.0, 8.0)


# ---------------------------------------------------------------- a ViT with known keys
PATCH = 8


@torch.no_grad()
def keyed_vit(num_registers: int = 0, depth: int = 1):
    """A ViT whose block-0 key of a patch is +u for a checkerboard-textured patch and -u for a smooth one.

    The patch embedding has one filter direction u (zero-mean, so LayerNorm keeps it): a checkerboard
    kernel (zero response to any constant or linear-gradient patch) with gain 4 and bias -1 per unit
    response. No positional embedding; norm1 is the identity LayerNorm; the qkv key block is the
    identity. Block 0's keys are therefore LN(patch embedding) = +-u/std: background patches all agree,
    object patches all agree, and the two groups are anti-correlated.
    """
    torch.manual_seed(0)
    model = build_vit("vitt", depth=depth, num_register_tokens=num_registers, patch_size=PATCH, img_size=64).eval()
    d = model.embed_dim
    u = torch.zeros(d)
    u[0], u[1] = 1.0, -1.0
    checker = (-1.0) ** (torch.arange(PATCH)[:, None] + torch.arange(PATCH)[None, :])
    kernel = checker.expand(3, PATCH, PATCH) / (3 * PATCH * PATCH)
    board = prepare_image(checkerboard_image(PATCH, PATCH, (0, 0, PATCH, PATCH), bg=(0, 0, 0)), PATCH).tensor
    unit_response = float((kernel * board).sum())
    model.patch_embed.proj.weight.copy_(u[:, None, None, None] * kernel * (4.0 / unit_response))
    model.patch_embed.proj.bias.copy_(-u)
    model.pos_embed.zero_()
    for block in model.blocks:  # later blocks barely move the tokens (LayerScale 1e-5)
        block.attn.qkv.weight[d : 2 * d].copy_(torch.eye(d))
        block.attn.qkv.bias.zero_()
    if num_registers:
        model.register_tokens.copy_(torch.randn(1, num_registers, d) * 3)
    return model


def checkerboard_image(h, w, box, bg=(40, 120, 200), gradient=0.0):
    """uint8 (3, h, w): a smooth background (colour + horizontal gradient) and a 0/255 checkerboard in box."""
    x0, y0, x1, y1 = box
    xs = torch.arange(w, dtype=torch.float32)
    img = torch.stack([(c + gradient * xs).expand(h, w) for c in bg]).round().clamp(0, 255)
    ys, xs2 = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = ((ys + xs2) % 2 * 255).float()
    img[:, y0:y1, x0:x1] = board[y0:y1, x0:x1]
    return img.to(torch.uint8)


def test_keys_are_captured_from_the_qkv_hook():
    torch.manual_seed(1)
    model = build_vit("vitt", depth=3, num_register_tokens=4, patch_size=PATCH, img_size=32).eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(x)
        outs = []
        for blk in model.blocks:
            outs.append(tokens)
            tokens = blk(tokens)
            outs[-1] = (outs[-1], tokens)
        d, r = model.embed_dim, model.num_register_tokens
        for layer in (1, -1):
            block_in, block_out = outs[layer]
            qkv = model.blocks[layer].attn.qkv(model.blocks[layer].norm1(block_in))
            for i, kind in enumerate("qkv"):
                got = token_features(model, x, layer=layer, kind=kind)
                assert got.shape == (2, 4 * 5, d)  # 20 patches: registers and CLS excluded
                assert torch.allclose(got, qkv[:, 1 + r :, i * d : (i + 1) * d], atol=1e-5)
            out = token_features(model, x, layer=layer, kind="out")
            assert torch.allclose(out, model.norm(block_out)[:, 1 + r :], atol=1e-5)
            register_keys = qkv[:, 1 : 1 + r, d : 2 * d]
            patch_keys = token_features(model, x, layer=layer, kind="k")
            assert torch.cdist(register_keys, patch_keys).min() > 1e-3  # no register among the patches
        both = capture_features(model, x, [(-1, "k"), (2, "k"), (0, "out")])
        assert set(both) == {(2, "k"), (0, "out")}  # -1 and 2 are the same block
    with pytest.raises(ValueError, match="kind must be one of"):
        token_features(model, x, kind="x")
    with pytest.raises(ValueError, match=r"layer=3 is out of range for a 3-block model"):
        token_features(model, x, layer=3)


def test_registers_never_enter_the_grid():
    plain, with_regs = keyed_vit(0), keyed_vit(4)
    img = checkerboard_image(64, 80, (16, 8, 48, 32))
    x = prepare_image(img, PATCH).tensor[None]
    k0, k4 = token_features(plain, x), token_features(with_regs, x)
    assert k0.shape == k4.shape == (1, 80, plain.embed_dim)
    assert torch.allclose(k0, k4, atol=1e-6)
    assert discover(plain, img) == discover(with_regs, img) == (16.0, 8.0, 48.0, 32.0)


@pytest.mark.parametrize(
    ("size", "box"),
    [
        ((64, 80), (16, 8, 48, 32)),
        ((64, 80), (0, 40, 24, 64)),  # touching the left and bottom borders
        ((64, 80), (56, 0, 80, 16)),  # touching the top-right corner
    ],
)
def test_discover_finds_the_textured_rectangle(size, box):
    model = keyed_vit(4)
    img = checkerboard_image(*size, box, gradient=0.5)
    assert discover(model, img) == tuple(float(v) for v in box)


def test_padding_box_is_clipped_to_the_image():
    # 45 x 61 pads to 48 x 64 (6 x 8 patches); the object runs to the bottom-right corner, so its last
    # patch row/column is partly padding. The box stops at the image border.
    img = checkerboard_image(45, 61, (40, 24, 61, 45))
    assert discover(keyed_vit(4), img) == (40.0, 24.0, 61.0, 45.0)


def write_dataset(tmp_path, cases, corrupt: bool = False) -> list[BoxedImage]:
    images = []
    for i, ((h, w), box) in enumerate(cases):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(checkerboard_image(h, w, box, gradient=0.3).permute(1, 2, 0).numpy()).save(path)
        images.append(BoxedImage(path, [ObjectBox(tuple(float(v) for v in box))]))
    if corrupt:
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
        images.insert(1, BoxedImage(bad, [ObjectBox((0.0, 0.0, 8.0, 8.0))]))
    return images


CASES = [((64, 80), (16, 8, 48, 32)), ((64, 72), (0, 40, 24, 64)), ((45, 61), (40, 24, 61, 45))]


def test_evaluate_lost_end_to_end(tmp_path):
    dataset = write_dataset(tmp_path, CASES, corrupt=True)
    result = evaluate_lost(keyed_vit(4), dataset)
    assert result["corloc"] == 100.0
    assert (result["num_images"], result["skipped_images"], result["fallbacks"]) == (3, 1, 0)
    assert result["skipped"][0]["file"].endswith("broken.jpg")
    assert [r["best_iou"] for r in result["per_image"]] == [1.0, 1.0, 1.0]
    assert result["settings"]["layer"] == 0 and result["settings"]["num_register_tokens"] == 4
    json.dumps(result)  # plain JSON types only
    # through the CSV reader, with a limit
    csv = tmp_path / "boxes.csv"
    csv.write_text("file,x0,y0,x1,y1\n" + "".join(f"im{i},{','.join(map(str, b))}\n" for i, (_, b) in enumerate(CASES)))
    for i in range(len(CASES)):
        (tmp_path / f"im{i}.png").rename(tmp_path / f"im{i}")
    assert evaluate_lost(keyed_vit(0), csv, limit=2, per_image=False)["num_images"] == 2


def test_sweep_forwards_each_image_once(tmp_path):
    dataset = write_dataset(tmp_path, CASES)
    model = keyed_vit(4, depth=2)
    calls = []
    model.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    sweep = sweep_lost(
        model, dataset, layers=[0, -1], kinds=["k", "out"], biases=[0.0, -1e6], normalizations=["none", "l2"]
    )
    assert len(calls) == len(CASES)
    assert len(sweep["settings"]) == 2 * 2 * 2 * 2
    by_key = {(s["layer"], s["kind"], s["normalize"], s["gram_bias"]): s for s in sweep["settings"]}
    # block 0's keys are the constructed ones: every image found; a huge negative bias leaves nothing
    # positive, so every image falls back to its seed patch (one patch vs an object of >= 9: IoU <= 1/9)
    assert by_key[(0, "k", "none", 0.0)]["corloc"] == 100.0
    assert by_key[(0, "k", "l2", -1e6)] == {
        "layer": 0, "kind": "k", "normalize": "l2", "gram_bias": -1e6, "corloc": 0.0, "fallbacks": 3,
    }  # fmt: skip
    assert sweep["best"]["corloc"] == 100.0
    assert sweep["best"] == sweep["settings"][0]  # ties keep the first setting in sweep order
    json.dumps(sweep)


def test_sweep_and_discover_errors(tmp_path):
    model = keyed_vit(0)
    dataset = write_dataset(tmp_path, CASES[:1])
    with pytest.raises(ValueError, match="biases is empty"):
        sweep_lost(model, dataset, biases=[])
    with pytest.raises(ValueError, match="normalize must be one of"):
        sweep_lost(model, dataset, normalizations=["whiten"])
    (tmp_path / "im0.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the 1 images could be decoded"):
        evaluate_lost(model, dataset)


def test_plot_lost_examples_writes_a_png(tmp_path):
    dataset = write_dataset(tmp_path, CASES[:2])
    out = plot_lost_examples(keyed_vit(4), dataset, tmp_path / "lost.png", num_images=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.asarray(Image.open(out)).shape[1] > 300

import json
import math

import numpy as np
import pytest
import torch

from tests.telemetry.planted import GRID, IMG, planted_vit, probe_images
from vitreg.data.probe import probe_tensor
from vitreg.telemetry.capture import Capture, LayerCapture, capture, neighbour_cosine
from vitreg.telemetry.measure import measure
from vitreg.telemetry.stats import HIST_EDGES, TelemetrySettings, compute_statistics

PLANTED = [0, 9, 27, 63]  # patch indices (row-major in the 8x8 grid)


@pytest.fixture(scope="module")
def planted_record():
    model = planted_vit(4, patches=PLANTED, block=5)
    return measure(model, probe_images(8), IMG)


@pytest.mark.parametrize("detector", ["robust_z", "valley"])
def test_adaptive_detectors_find_exactly_the_planted_patches_from_the_planted_layer(planted_record, detector):
    record, _ = planted_record
    fractions = record["outliers"][detector]["patch_fraction"]
    expected = len(PLANTED) / GRID**2
    assert fractions[:6] == [0.0] * 6  # layers 0..5: before block 5 has run
    assert fractions[6:] == pytest.approx([expected] * 7)
    assert record["emergence_layer"][detector] == 6
    assert record["outliers"][detector]["register_fraction"][-1] == 0.0


def test_fixed_cutoff_is_a_plain_threshold(planted_record):
    record, _ = planted_record
    last_max = record["norms"]["prenorm"]["patch"]["max"][-1]
    assert record["outliers"]["fixed"]["threshold"][-1] == 150.0
    assert record["outliers"]["fixed"]["patch_fraction"][-1] == (0.0 if last_max <= 150 else pytest.approx(1 / 16))
    cut = TelemetrySettings(fixed_cutoff=40.0)
    rec, _ = measure(planted_vit(4, patches=PLANTED, block=5), probe_images(8), IMG, cut)
    assert rec["outliers"]["fixed"]["patch_fraction"][-1] == pytest.approx(len(PLANTED) / GRID**2)


def test_position_map_and_outlier_maps_mark_the_planted_positions(planted_record):
    record, maps = planted_record
    freq = np.array(record["position_frequency"])
    expected = np.zeros(GRID * GRID)
    expected[PLANTED] = 1.0
    np.testing.assert_array_equal(freq.ravel(), expected)
    assert maps["outliers"].shape == (4, GRID, GRID)
    assert maps["outliers"].reshape(4, -1)[:, PLANTED].all() and maps["outliers"].sum() == 4 * len(PLANTED)
    assert maps["norm"].shape == (4, GRID, GRID)
    assert maps["register_attention"].shape == (4, 4, GRID, GRID)


def test_emergence_layer_follows_the_planted_block():
    for block in (1, 9):
        record, _ = measure(planted_vit(0, patches=[5, 6], block=block), probe_images(8), IMG)
        assert record["emergence_layer"]["valley"] == block + 1
        assert record["emergence_layer"]["robust_z"] == block + 1
        assert record["registers"] is None


def test_registers_that_absorb_the_norms_are_reported_as_absorbing():
    record, _ = measure(planted_vit(4, registers=[1, 2], block=5), probe_images(8), IMG)
    assert record["outliers"]["valley"]["register_fraction"][-1] == 0.5
    assert record["outliers"]["valley"]["patch_fraction"][-1] == 0.0
    assert record["emergence_layer"]["valley"] is None  # the patches stay clean
    assert record["registers"]["absorbing"] is True
    ratio = record["registers"]["norm_ratio"]
    assert min(ratio[1], ratio[2]) > 5 > max(ratio[0], ratio[3])
    per_register = record["norms"]["prenorm"]["per_register_median"][-1]
    assert min(per_register[1], per_register[2]) > 5 * max(per_register[0], per_register[3])
    clean, _ = measure(planted_vit(4, patches=PLANTED, block=5), probe_images(8), IMG)
    assert clean["registers"]["absorbing"] is False


def test_identical_registers_are_flagged_and_distinct_ones_are_not():
    same, _ = measure(planted_vit(4, identical_registers=True), probe_images(4), IMG)
    assert same["registers"]["identical"] is True
    assert same["registers"]["cosine_max"] == pytest.approx(1.0, abs=1e-6)
    assert same["registers"]["param_cosine_max"] == pytest.approx(1.0, abs=1e-6)
    model = planted_vit(4)
    with torch.no_grad():
        model.register_tokens.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    distinct, _ = measure(model, probe_images(4), IMG)
    assert distinct["registers"]["identical"] is False
    assert distinct["registers"]["cosine_max"] < 0.99


@pytest.mark.parametrize("registers", [0, 16])
def test_runs_with_no_and_many_registers_and_is_json_ready(registers):
    record, maps = measure(planted_vit(registers, patches=[3], block=2), probe_images(4), IMG)
    assert record["num_registers"] == registers
    assert len(record["outliers"]["valley"]["patch_fraction"]) == 13
    assert ("register" in record["norms"]["prenorm"]) == bool(registers)
    if registers:
        assert len(record["registers"]["cosine_with_cls"]) == 16
        assert maps["register_attention"].shape[1] == 16
    json.dumps(record, allow_nan=False)  # NaN-free: the writer stores strict JSON


def test_norm_quantiles_and_histograms_match_numpy():
    model = planted_vit(4)
    x = torch.randn(3, 3, IMG, IMG)
    cap = capture(model.eval(), x)
    record, _ = compute_statistics(cap)
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(x)
        for blk in model.blocks:
            tokens = blk(tokens)
        pre = tokens.norm(dim=-1)[:, 5:].double().numpy().ravel()
        post = model.norm(tokens).norm(dim=-1)[:, 5:].double().numpy().ravel()
    patch = record["norms"]["prenorm"]["patch"]
    assert patch["p50"][-1] == pytest.approx(np.quantile(pre, 0.5), rel=1e-5)
    assert patch["p99"][-1] == pytest.approx(np.quantile(pre, 0.99), rel=1e-5)
    assert patch["max"][-1] == pytest.approx(pre.max(), rel=1e-5)
    assert record["norms"]["postnorm"]["patch"]["p90"][-1] == pytest.approx(np.quantile(post, 0.9), rel=1e-5)
    assert record["norms"]["prenorm"]["histogram"][-1] == np.histogram(pre, HIST_EDGES)[0].tolist()


def test_student_in_train_mode_is_measured_in_eval_mode_and_restored():
    model = planted_vit(4)
    for blk in model.blocks:
        blk.drop_path = 0.5
    model.train()
    a, _ = measure(model, probe_images(2), IMG)
    b, _ = measure(model, probe_images(2), IMG)
    assert model.training
    assert a["norms"]["prenorm"]["patch"]["p50"] == b["norms"]["prenorm"]["patch"]["p50"]  # no drop path


def test_chunked_measurement_equals_one_batch():
    model = planted_vit(4, patches=PLANTED, block=5)
    whole, _ = measure(model, probe_images(6), IMG, TelemetrySettings(chunk_size=16))
    parts, _ = measure(model, probe_images(6), IMG, TelemetrySettings(chunk_size=4))
    assert whole["outliers"] == parts["outliers"]
    for q, values in whole["norms"]["prenorm"]["patch"].items():
        assert values == pytest.approx(parts["norms"]["prenorm"]["patch"][q], rel=1e-5)
    assert whole["attention"]["cls_entropy"][1:] == pytest.approx(parts["attention"]["cls_entropy"][1:], rel=1e-5)


def test_neighbour_cosine_against_a_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 3 * 4, 5, generator=g)
    out = neighbour_cosine(tokens, (3, 4))
    grid = tokens.view(2, 3, 4, 5)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                sims = [
                    torch.cosine_similarity(grid[b, i, j], grid[b, i + di, j + dj], dim=0)
                    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
                    if 0 <= i + di < 3 and 0 <= j + dj < 4
                ]
                assert out[b, i, j] == pytest.approx(float(torch.stack(sims).mean()), abs=1e-6)


def test_planted_outliers_are_more_redundant_when_their_patches_repeat_their_neighbours():
    # a constant image: every patch equals its neighbours at the patch embedding
    model = planted_vit(0, patches=[27, 28, 35, 36], block=3)
    flat = torch.full((2, 3, IMG, IMG), 128, dtype=torch.uint8)
    record, _ = measure(model, flat, IMG)
    assert record["redundancy"]["outlier_neighbour_cosine"] == pytest.approx(1.0, abs=1e-5)


def fake_capture(cls_rows: torch.Tensor, received: torch.Tensor, num_registers: int, grid=(1, 4)) -> Capture:
    b, _, t = cls_rows.shape
    norms = torch.ones(b, t)
    layer0 = LayerCapture(
        norms, norms, torch.zeros(b, 1 + num_registers, 2), 1.0, 1.0, torch.zeros(b), torch.ones(b, 2)
    )
    layer1 = LayerCapture(
        norms,
        norms,
        torch.zeros(b, 1 + num_registers, 2),
        1.0,
        1.0,
        torch.zeros(b),
        torch.ones(b, 2),
        cls_rows,
        received,
        torch.zeros(b, num_registers, t),
    )
    return Capture([layer0, layer1], grid, num_registers, torch.zeros(b, *grid))


def test_attention_mass_split_by_token_kind():
    from vitreg.telemetry.stats import _attention

    # tokens: CLS, 2 registers, 4 patches; patch 1 is an outlier
    cls = torch.tensor([[[0.1, 0.2, 0.1, 0.1, 0.4, 0.05, 0.05]]])  # (B=1, H=1, T=7)
    received = torch.tensor([[[0.3, 0.1, 0.1, 0.2, 0.1, 0.1, 0.1]]])
    cap = fake_capture(cls, received, num_registers=2)
    outlier = torch.tensor([[False, True, False, False]])
    att = _attention(cap, outlier)
    assert att["cls_to_cls"] == [None, pytest.approx(0.1)]
    assert att["cls_to_registers"][1] == pytest.approx(0.3)
    assert att["cls_to_outliers"][1] == pytest.approx(0.4)
    assert att["cls_to_normals"][1] == pytest.approx(0.2)
    assert att["all_to_registers"][1] == pytest.approx(0.2)
    assert att["all_to_outliers"][1] == pytest.approx(0.1)
    assert att["heads_argmax_outlier_or_register"][1] == 1.0  # the CLS row's top key is the outlier
    p = torch.tensor([0.1, 0.4, 0.05, 0.05]) / 0.6
    assert att["cls_entropy"][1] == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-6)


def test_uniform_cls_attention_has_entropy_one():
    from vitreg.telemetry.stats import _attention

    cls = torch.full((2, 3, 5), 0.2)
    cap = fake_capture(cls, cls, num_registers=0)
    att = _attention(cap, torch.zeros(2, 4, dtype=torch.bool))
    assert att["cls_entropy"][1] == pytest.approx(1.0)
    assert att["cls_to_outliers"][1] == 0.0


def test_the_attention_bias_sink_is_measured_like_a_register():
    from vitreg.models.vision_transformer import build_vit

    torch.manual_seed(0)
    model = build_vit("vitt", depth=2, num_register_tokens=0, img_size=IMG, attn_bias="kv").eval()
    with torch.no_grad():  # the last block's queries all point along the sink's key: (nearly) all mass goes there
        attn = model.blocks[1].attn
        attn.qkv.bias[: model.embed_dim].fill_(5.0)
        attn.sink_key.fill_(5.0)
    record, _ = measure(model, probe_images(2), IMG)
    attention = record["attention"]
    assert attention["cls_to_sink"][0] is None  # layer 0 has no attention
    assert attention["cls_to_sink"][2] > 0.99 and attention["all_to_sink"][2] > 0.99
    assert 0 < attention["all_to_sink"][1] < 0.99  # the first block's zero sink takes its exp(0) share
    plain, _ = measure(planted_vit(0), probe_images(2), IMG)
    assert set(plain["attention"]["cls_to_sink"]) == {None}


def test_cls_patch_cosine_is_the_output_cosine_and_a_planted_channel_is_found():
    from vitreg.models.vision_transformer import build_vit

    torch.manual_seed(0)
    model = build_vit("vitt", depth=2, num_register_tokens=2, img_size=IMG).eval()
    images = probe_images(3)
    record, _ = measure(model, images, IMG)
    with torch.no_grad():
        out = model.forward_features(probe_tensor(images, IMG))
    cls = torch.nn.functional.normalize(out["x_norm_clstoken"], dim=-1)
    patches = torch.nn.functional.normalize(out["x_norm_patchtokens"], dim=-1)
    expected = float((patches @ cls.unsqueeze(-1)).mean())
    assert record["cls_patch_cosine"][-1] == pytest.approx(expected, abs=1e-6)
    assert record["channel_outliers"]["count"] == [0, 0, 0]  # a random model has no outlying channel
    with torch.no_grad():  # channel 7 carries a constant through the residual stream, in every token
        model.pos_embed[..., 7] += 50.0
    planted, _ = measure(model, images, IMG)
    assert planted["channel_outliers"]["count"] == [1, 1, 1]
    assert planted["channel_outliers"]["last_layer_channels"] == [7]
    assert min(planted["channel_outliers"]["max_ratio"]) > 10


def test_zeroed_registers_do_not_move_the_patch_thresholds():
    # an ablation that zeroes the registers leaves tokens of norm 0; they are no population to fit
    model = planted_vit(num_registers=4, patches=[3, 12, 40, 51], block=5)
    images = probe_images(8)
    plain, _ = measure(model, images, IMG, TelemetrySettings(attention=False, register_neurons=False))

    def zero_registers(tokens):
        out = tokens.clone()
        out[:, model.layout.registers_slice] = 0
        return out

    with model.edit(outputs={b: zero_registers for b in range(model.n_blocks)}):
        ablated, _ = measure(model, images, IMG, TelemetrySettings(attention=False, register_neurons=False))
    for detector in ("valley", "robust_z"):
        assert ablated["outliers"][detector]["patch_fraction"][-1] == pytest.approx(4 / 64)
        assert plain["outliers"][detector]["patch_fraction"][-1] == pytest.approx(4 / 64)

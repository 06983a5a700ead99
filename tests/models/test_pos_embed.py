"""``interpolate_pos_embed`` against an independent float64 NumPy bicubic written from the formulas.

The reference never calls ``torch.nn.functional.interpolate``. It builds one (out_len, in_len)
weight matrix per axis and applies them separably, ``out = W_h @ grid @ W_w.T`` per channel.

What torch (checked on 2.13, CPU) does, established by experiment against this reference:

* ``antialias=False`` (plain bicubic): Keys cubic convolution with a = -0.75, 4 taps at
  ``floor(src) - 1 .. floor(src) + 2`` with ``src = (i + 0.5) * ratio - 0.5``, out-of-range tap
  indices clamped to the border. With ``scale_factor`` given (and ``recompute_scale_factor`` unset)
  ``ratio = 1 / scale_factor`` -- i.e. ``M / (h + offset)``, not ``M / h`` -- while the output
  length is ``floor(M * scale_factor)``. With ``size`` given, ``ratio = in_len / out_len``.
* ``antialias=True``: the PIL-style filter, *also when upsampling*: Keys a = -0.5 (not -0.75),
  ``center = (i + 0.5) * ratio``, half-width ``2 * max(ratio, 1)``, taps ``[xmin, xmax)`` with
  ``xmin = max(int(center - support + 0.5), 0)`` and ``xmax = min(int(center + support + 0.5),
  in_len)``, weights ``cubic((j - center + 0.5) / max(ratio, 1))`` renormalised to sum 1. Taps
  falling off the edge are dropped (then renormalised), not clamped. ``int()`` truncating towards
  zero versus ``floor`` makes no difference here because of the ``max(..., 0)``. The ratio is again
  ``1 / scale_factor`` on the scale-factor path. So antialias changes the result even for
  upsampling (kernel and border handling differ), not only for downsampling.
* Either mode matches the reference to a few 1e-6 on N(0, 1) data (float32 rounding); using the
  other mode's ``a`` is off by ~0.1-0.3, so the tolerance below is very discriminating.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitreg.models import build_vit, interpolate_pos_embed

M = 16  # 224 px at patch 14
ATOL = RTOL = 1e-5


# ---------------------------------------------------------------- reference
def keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient ``a`` (support [-2, 2])."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def plain_bicubic_matrix(in_len: int, out_len: int, ratio: float, a: float = -0.75) -> np.ndarray:
    """Rows: output positions; 4 taps around the half-pixel source coordinate, indices clamped."""
    weights = np.zeros((out_len, in_len))
    for i in range(out_len):
        src = (i + 0.5) * ratio - 0.5
        base = math.floor(src)
        frac = src - base
        for k in range(-1, 3):
            j = min(max(base + k, 0), in_len - 1)
            weights[i, j] += keys_cubic(frac - k, a)
    return weights


def antialias_bicubic_matrix(in_len: int, out_len: int, ratio: float, a: float = -0.5) -> np.ndarray:
    """PIL-style separable filter: kernel stretched by max(ratio, 1), truncated at the edges, renormalised."""
    weights = np.zeros((out_len, in_len))
    support_scale = max(ratio, 1.0)
    support = 2.0 * support_scale
    for i in range(out_len):
        center = (i + 0.5) * ratio
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_len)
        taps = np.arange(xmin, xmax)
        w = keys_cubic((taps - center + 0.5) / support_scale, a)
        weights[i, taps] = w / w.sum()
    return weights


def reference_interpolate(
    pos_embed: np.ndarray, grid_hw: tuple[int, int], *, antialias: bool, offset: float, a: float | None = None
) -> np.ndarray:
    """(1, 1 + M*M, D) -> (1, 1 + h*w, D) in float64, mirroring DINOv2's two resize paths."""
    table = np.asarray(pos_embed, dtype=np.float64)
    side = math.isqrt(table.shape[1] - 1)
    h, w = grid_hw
    dim = table.shape[-1]
    grid = table[0, 1:].reshape(side, side, dim)
    if offset:  # scale_factor path: the coordinate map uses the *given* factor, 1/s = M/(h+offset)
        ratio_h, ratio_w = side / (h + offset), side / (w + offset)
    else:  # size path
        ratio_h, ratio_w = side / h, side / w
    matrix = antialias_bicubic_matrix if antialias else plain_bicubic_matrix
    kw = {} if a is None else {"a": a}  # default: -0.5 antialiased, -0.75 plain
    wh, ww = matrix(side, h, ratio_h, **kw), matrix(side, w, ratio_w, **kw)
    out = np.einsum("ij,jkd,lk->ild", wh, grid, ww).reshape(1, h * w, dim)
    return np.concatenate([table[:, :1], out], axis=1)


def random_table(side: int = M, dim: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1 + side * side, dim, generator=gen)


def assert_matches(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert actual.dtype == torch.float32
    assert tuple(actual.shape) == expected.shape
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- reference vs implementation
@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("offset", [0.0, 0.1], ids=["size_path", "offset_path"])
@pytest.mark.parametrize(
    "grid_hw",
    [(7, 7), (37, 37), (19, 27), (27, 19), (1, 1)],
    ids=["down_7x7", "up_37x37", "nonsquare_19x27", "nonsquare_27x19", "single_1x1"],
)
def test_matches_numpy_reference(grid_hw, offset, antialias):
    table = random_table(dim=6, seed=1)
    out = interpolate_pos_embed(table, grid_hw, antialias=antialias, offset=offset)
    assert_matches(out, reference_interpolate(table.numpy(), grid_hw, antialias=antialias, offset=offset))


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
def test_reference_is_discriminating(antialias):
    """The other mode's Keys coefficient misses torch by far more than the tolerance."""
    table = random_table(dim=4, seed=2)
    wrong_a = -0.75 if antialias else -0.5
    for grid_hw in [(7, 7), (37, 37)]:
        for offset in (0.0, 0.1):
            out = interpolate_pos_embed(table, grid_hw, antialias=antialias, offset=offset).double().numpy()
            wrong = reference_interpolate(table.numpy(), grid_hw, antialias=antialias, offset=offset, a=wrong_a)
            assert np.abs(out - wrong).max() > 1e-2


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("grid_hw", [(7, 7), (37, 37), (19, 27)])
def test_offset_path_differs_from_size_path(grid_hw, antialias):
    """Same output size, different sampling positions: the DINOv2 offset kludge changes the values."""
    table = random_table(dim=5, seed=3)
    by_offset = interpolate_pos_embed(table, grid_hw, antialias=antialias, offset=0.1)
    by_size = interpolate_pos_embed(table, grid_hw, antialias=antialias, offset=0.0)
    assert by_offset.shape == by_size.shape == (1, 1 + grid_hw[0] * grid_hw[1], 5)
    assert (by_offset - by_size).abs().max() > 1e-2
    assert_matches(by_offset, reference_interpolate(table.numpy(), grid_hw, antialias=antialias, offset=0.1))
    assert_matches(by_size, reference_interpolate(table.numpy(), grid_hw, antialias=antialias, offset=0.0))
    # And the offset result is *not* what the in/out ratio would give.
    assert (
        np.abs(
            by_offset.double().numpy() - reference_interpolate(table.numpy(), grid_hw, antialias=antialias, offset=0.0)
        ).max()
        > 1e-2
    )


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_constant_table_stays_constant(offset, antialias):
    """Both kernels are partitions of unity, so a constant grid resamples to the same constant."""
    table = torch.full((1, 1 + M * M, 3), 0.25)
    for grid_hw in [(7, 7), (37, 37), (19, 27)]:
        out = interpolate_pos_embed(table, grid_hw, antialias=antialias, offset=offset)
        torch.testing.assert_close(out, torch.full_like(out, 0.25), rtol=0, atol=1e-6)
        ref = reference_interpolate(table.numpy(), grid_hw, antialias=antialias, offset=offset)
        np.testing.assert_allclose(ref, 0.25, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- CLS and dtype
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_cls_passthrough_and_float32_output(dtype, offset):
    table = random_table(dim=8, seed=4).to(dtype)
    for antialias in (False, True):
        out = interpolate_pos_embed(table, (7, 7), antialias=antialias, offset=offset)
        assert out.dtype == torch.float32
        assert out.shape == (1, 1 + 49, 8)
        assert torch.equal(out[:, 0], table[:, 0].float())
        # The grid is resampled from the low-precision values, upcast exactly to float32 first.
        ref = reference_interpolate(table.float().numpy(), (7, 7), antialias=antialias, offset=offset)
        assert_matches(out, ref)


def test_input_table_is_not_modified():
    table = random_table(dim=3, seed=5)
    before = table.clone()
    interpolate_pos_embed(table, (7, 7), antialias=True, offset=0.1)
    assert torch.equal(table, before)


# ---------------------------------------------------------------- model level
@pytest.mark.parametrize(
    ("regs", "overrides", "antialias", "offset"),
    [
        (4, {}, True, 0.0),  # DINOv2 register models
        (0, {}, False, 0.1),  # DINOv2 models without registers
        (4, {"interpolate_antialias": False, "interpolate_offset": 0.1}, False, 0.1),  # pinned
        (0, {"interpolate_antialias": True, "interpolate_offset": 0.0}, True, 0.0),  # pinned
    ],
    ids=["reg4_default", "reg0_default", "reg4_pinned", "reg0_pinned"],
)
def test_model_interpolate_pos_encoding(regs, overrides, antialias, offset):
    torch.manual_seed(0)
    model = build_vit("vitt", depth=1, num_register_tokens=regs, **overrides)
    assert model.cfg.grid_size == M
    assert model.cfg.antialias is antialias
    assert model.cfg.offset == offset
    with torch.no_grad():  # a table with O(1) entries so the comparison is not dominated by atol
        model.pos_embed.copy_(random_table(dim=model.embed_dim, seed=6))

    same = model.interpolate_pos_encoding((M, M), torch.float32)
    assert same is model.pos_embed
    assert torch.equal(same, model.pos_embed)

    table = model.pos_embed.detach().numpy()
    out = model.interpolate_pos_encoding((7, 7), torch.float32)
    assert_matches(out.detach(), reference_interpolate(table, (7, 7), antialias=antialias, offset=offset))
    out_nonsquare = model.interpolate_pos_encoding((19, 27), torch.float32)
    assert_matches(out_nonsquare.detach(), reference_interpolate(table, (19, 27), antialias=antialias, offset=offset))

    low = model.interpolate_pos_encoding((7, 7), torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, out.to(torch.bfloat16))


# ---------------------------------------------------------------- errors and offset edge cases
@pytest.mark.parametrize("offset", [0.5, 0.9, 0.99])
def test_large_offsets_below_one_still_give_exact_size(offset):
    """floor(M * (h + offset) / M) == h for 0 < offset < 1 (M = 16 divides exactly), so these work."""
    table = random_table(dim=3, seed=7)
    for grid_hw in [(7, 7), (19, 27)]:
        for antialias in (False, True):
            out = interpolate_pos_embed(table, grid_hw, antialias=antialias, offset=offset)
            assert_matches(out, reference_interpolate(table.numpy(), grid_hw, antialias=antialias, offset=offset))


@pytest.mark.parametrize(
    ("side", "grid_hw", "offset"),
    [
        (M, (7, 7), 1.0),  # h + 1 rows
        (M, (7, 12), 1.5),
        # Below 1 but 7 + offset rounds to 8.0 in float64: overshoots by a row.
        (M, (7, 7), math.nextafter(1.0, 0.0)),
        # Positive but negligible: 39 + 1e-300 == 39 and 39 / 37 * 37 == 38.999..., floored to 38.
        (37, (39, 39), 1e-300),
    ],
    ids=["offset_1", "offset_1.5", "offset_just_below_1", "offset_tiny_undershoot"],
)
def test_offset_that_changes_grid_size_raises(side, grid_hw, offset):
    table = random_table(side=side, dim=3, seed=8)
    for antialias in (False, True):
        with pytest.raises(ValueError, match="interpolate_offset"):
            interpolate_pos_embed(table, grid_hw, antialias=antialias, offset=offset)


@pytest.mark.parametrize("num_grid", [15, 24, 2])
def test_non_square_table_raises(num_grid):
    table = torch.randn(1, 1 + num_grid, 3)
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(table, (4, 4), antialias=False, offset=0.0)

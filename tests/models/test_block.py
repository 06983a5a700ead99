"""Stochastic depth exactly as DINOv2 trains it: batch subsets per crop group, or per-sample DropPath."""

from __future__ import annotations

import torch

from vitreg.models.block import Block, per_sample_keep_mask, sample_subset


def block(drop_path: float) -> Block:
    torch.manual_seed(0)
    return Block(32, 2, "mlp", 64, layerscale_init=0.5, drop_path=drop_path)


def test_sample_subset_keeps_int_b_times_one_minus_p_samples_per_group():
    rows, scale, kept = sample_subset([(10, 3), (7, 2)], 0.4, torch.device("cpu"))
    assert kept == [(6, 3), (4, 2)]  # int(10*0.6)=6, int(7*0.6)=4
    assert rows.numel() == 6 * 3 + 4 * 2
    assert torch.equal(scale[:18], torch.full((18,), 10 / 6)) and torch.equal(scale[18:], torch.full((8,), 7 / 4))
    first, second = rows[:18].view(6, 3), rows[18:].view(4, 2)
    # whole samples are taken: consecutive token rows of one image, from inside its own group
    assert torch.equal(first - first[:, :1], torch.arange(3).expand(6, 3)) and torch.all(first[:, 0] % 3 == 0)
    assert torch.all((second >= 30) & (second < 44)) and torch.all((second[:, 0] - 30) % 2 == 0)
    assert len(set(first[:, 0].tolist())) == 6


def test_sample_subset_keeps_at_least_one_sample():
    _, _, kept = sample_subset([(2, 4)], 0.9, torch.device("cpu"))
    assert kept == [(1, 4)]


def test_subset_residual_updates_only_kept_samples_scaled_by_b_over_kept():
    blk = block(0.5).train()
    x = torch.randn(8, 5, 32)
    torch.manual_seed(1)
    out = blk(x)
    # recompute by hand with the same random draws: attention subset, then FFN subset
    torch.manual_seed(1)
    y = x.clone()
    for branch in ("attn", "ffn"):
        kept = torch.randperm(8)[:4]
        sub = y[kept]
        res = blk.ls1(blk.attn(blk.norm1(sub))) if branch == "attn" else blk.ls2(blk.mlp(blk.norm2(sub)))
        y = y.index_add(0, kept, res * 2.0)
    torch.testing.assert_close(out, y)


def test_small_rates_use_per_sample_droppath_on_a_single_batch():
    blk = block(0.1).train()
    x = torch.randn(64, 3, 32)
    torch.manual_seed(2)
    out = blk(x)
    torch.manual_seed(2)
    keep_attn = torch.empty(64).bernoulli_(0.9)
    dropped_both = (keep_attn == 0) & (torch.empty(64).bernoulli_(0.9) == 0)
    assert torch.equal(out[dropped_both], x[dropped_both])
    assert torch.equal(out[keep_attn == 1] != x[keep_attn == 1], torch.ones_like(x[keep_attn == 1], dtype=torch.bool))


def test_per_sample_keep_mask_values():
    torch.manual_seed(0)
    mask = per_sample_keep_mask([(1000, 2)], 0.25, torch.empty(0))
    values = set(mask.flatten().tolist())
    assert values <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.equal(mask[0::2], mask[1::2])  # same draw for every token of a sample
    assert abs((mask != 0).float().mean().item() - 0.75) < 0.05


def test_eval_mode_is_deterministic_with_drop_path():
    blk = block(0.4).eval()
    x = torch.randn(4, 5, 32)
    torch.testing.assert_close(blk(x), blk(x))
    expected = x + blk.ls1(blk.attn(blk.norm1(x)))
    expected = expected + blk.ls2(blk.mlp(blk.norm2(expected)))
    torch.testing.assert_close(blk(x), expected)


def test_packed_groups_use_subsets_even_for_small_rates():
    blk = block(0.05).train()
    a, b = torch.randn(20, 3, 32), torch.randn(20, 2, 32)
    packed = torch.cat([a.reshape(-1, 32), b.reshape(-1, 32)])
    torch.manual_seed(3)
    out = blk(packed, [(20, 3), (20, 2)])
    # replay the draws: per branch, one randperm per group; int(20 * 0.95) = 19 samples kept
    torch.manual_seed(3)
    attn_a, _ = torch.randperm(20)[:19], torch.randperm(20)
    ffn_a, _ = torch.randperm(20)[:19], torch.randperm(20)
    out_a = out[:60].view(20, 3, 32)
    for i in range(20):
        touched = i in attn_a.tolist() or i in ffn_a.tolist()
        assert torch.equal(out_a[i], a[i]) != touched

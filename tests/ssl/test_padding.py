"""iBOT's masked tokens padded to the batch's upperbound (static shapes for compile) give the unpadded
numbers: padded rows take no mass in Sinkhorn-Knopp, stay out of the centre and weigh 0 in the loss."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import TINY, compose_config
from tests.ssl.test_objective import make_batch
from vitreg.lit.module import build_objective
from vitreg.ssl.objective import MaskedTokens
from vitreg.ssl.targets import Centering, sinkhorn_knopp

# fp32 sums over a longer (zero-padded) row regroup their additions: equal up to a few ulps, not bitwise
RTOL, ATOL = 1e-5, 1e-7


def padded(logits: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    junk = torch.randn(extra, logits.shape[1]) * 3  # whatever a padded row holds must not matter
    valid = torch.cat([torch.ones(len(logits), dtype=torch.bool), torch.zeros(extra, dtype=torch.bool)])
    return torch.cat([logits, junk]), valid


def test_sinkhorn_knopp_ignores_padded_rows():
    torch.manual_seed(0)
    logits = torch.randn(37, 64)
    with_pad, valid = padded(logits, 11)
    expected = sinkhorn_knopp(logits, 0.07, total_count=37)
    got = sinkhorn_knopp(with_pad, 0.07, total_count=37, valid=valid)
    torch.testing.assert_close(got[:37], expected, rtol=RTOL, atol=ATOL)
    assert torch.equal(got[37:], torch.zeros(11, 64))


def test_sinkhorn_knopp_with_only_padded_rows_gives_zero_targets():
    # a batch whose masks are all empty, padded to its upperbound: unpadded it has no row at all
    got = sinkhorn_knopp(torch.randn(5, 64), 0.07, total_count=torch.tensor(0), valid=torch.zeros(5, dtype=torch.bool))
    assert torch.equal(got, torch.zeros(5, 64))


def test_centre_update_ignores_padded_rows():
    torch.manual_seed(0)
    logits = torch.randn(37, 64)
    with_pad, valid = padded(logits, 11)
    plain, pad = Centering(64), Centering(64)
    plain.update(logits)
    pad.stage_update(with_pad, valid, 37)
    pad.commit()
    torch.testing.assert_close(pad.center, plain.center, rtol=RTOL, atol=ATOL)


def test_masked_tokens_pad_to_the_upperbound_with_zero_weight():
    cfg = compose_config(TINY)
    batch = make_batch(cfg, n=8)
    count, upperbound = len(batch["mask_indices"]), batch["upperbound"]
    assert upperbound > count  # the case under test: real padding
    masked = MaskedTokens.from_batch(batch, pad=True)
    assert masked.indices.shape == masked.weights.shape == masked.valid.shape == (upperbound,)
    assert masked.count == count and int(masked.valid.sum()) == count
    assert torch.equal(masked.indices[:count], batch["mask_indices"])
    assert torch.equal(masked.weights[count:], torch.zeros(upperbound - count))
    assert MaskedTokens.from_batch(batch, pad=False).indices.shape == (count,)


@pytest.mark.parametrize(
    "extra",
    [[], ["ssl.centering=sinkhorn_knopp"], ["ssl.ibot.separate_head=true"]],
    ids=["centering", "sinkhorn_knopp", "separate_head"],
)
@pytest.mark.parametrize("empty_masks", [False, True], ids=["masked", "no_masked_token"])
def test_padded_objective_equals_unpadded(extra, empty_masks):
    cfg = compose_config(TINY + extra)
    torch.manual_seed(0)
    unpadded = build_objective(compose_config([*TINY, *extra, "ssl.ibot.pad_masked_tokens=false"]))
    pad = copy.deepcopy(unpadded)
    pad.cfg.ibot.pad_masked_tokens = True
    assert not unpadded.cfg.ibot.pad_masked_tokens
    batch = make_batch(cfg, n=8)
    assert batch["upperbound"] > len(batch["mask_indices"])
    if empty_masks:  # possible on small grids: every drawn mask empty, yet an upperbound to pad to
        batch["masks"] = torch.zeros_like(batch["masks"])
        batch["mask_indices"], batch["masks_weight"] = batch["mask_indices"][:0], batch["masks_weight"][:0]
        batch["n_masked_patches"] = torch.zeros_like(batch["n_masked_patches"])
    results = []
    for objective in (unpadded, pad):
        torch.manual_seed(1)  # the same drop-path draws
        terms = objective(batch, teacher_temp=0.05)
        terms["loss"].backward()
        objective.commit_centers()
        results.append((terms, objective))
    (terms_a, a), (terms_b, b) = results
    assert terms_a.keys() == terms_b.keys()
    for name in terms_a:
        assert torch.isfinite(terms_b[name]), name
        torch.testing.assert_close(terms_b[name], terms_a[name], rtol=RTOL, atol=ATOL, msg=name)
    for (name, pa), pb in zip(a.student.named_parameters(), b.student.parameters(), strict=True):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(bb, ba, rtol=RTOL, atol=ATOL, msg=name)

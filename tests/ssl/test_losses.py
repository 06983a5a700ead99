"""DINO, iBOT and KoLeo losses against explicit float64 computations of DINOv2's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.ssl import reference as ref
from vitreg.ssl.losses import cross_entropy_to_targets, dino_loss, ibot_loss, koleo_loss


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def probs(*shape: int, seed: int) -> torch.Tensor:
    return torch.softmax(randn(*shape, seed=seed) * 3, dim=-1)


def test_cross_entropy_to_targets_per_row_in_fp32():
    s, t = randn(6, 11, seed=0), probs(6, 11, seed=1)
    out = cross_entropy_to_targets(s.half(), t.half(), student_temp=0.2)
    assert out.shape == (6,) and out.dtype == torch.float32
    expected = ref.cross_entropy(s.half().double().numpy(), t.half().double().numpy(), 0.2)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("n_local", [8, 3])
def test_dino_loss_matches_explicit_loop_over_crop_pairs(n_local):
    b, k = 5, 13
    s_global, s_local = randn(2 * b, k, seed=2), randn(n_local * b, k, seed=3)
    t = probs(2 * b, k, seed=4)
    local, glob = dino_loss(s_global, s_local, t, student_temp=0.1)

    # student crops: [global view0, global view1, local 0..L-1]; teacher views: [view0, view1]
    s_np, t_np = s_global.double().numpy(), t.double().numpy()
    students = [s_np[:b], s_np[b:], *s_local.double().numpy().reshape(n_local, b, k)]
    teachers = [t_np[:b], t_np[b:]]
    exp_local = exp_global = 0.0
    n_terms = 0
    for i, s in enumerate(students):
        for v, tv in enumerate(teachers):
            if i == v:  # a global view is never matched with itself
                continue
            n_terms += 1
            ce = ref.cross_entropy(s, tv, 0.1).mean()
            if i < 2:
                exp_global += ce
            else:
                exp_local += ce
    assert n_terms == 2 + 2 * n_local  # 18 for L = 8
    assert local.dtype == glob.dtype == torch.float32 and local.shape == glob.shape == ()
    np.testing.assert_allclose(local.item(), exp_local / n_terms, rtol=1e-5)
    np.testing.assert_allclose(glob.item(), exp_global / n_terms, rtol=1e-5)


def test_dino_loss_without_local_crops_and_gradients():
    b, k = 4, 9
    s_global = randn(2 * b, k, seed=5).requires_grad_()
    t = probs(2 * b, k, seed=6)
    local, glob = dino_loss(s_global, None, t)
    assert local.item() == 0.0
    s_np, t_np = s_global.detach().double().numpy(), t.double().numpy()
    expected = (ref.cross_entropy(s_np[:b], t_np[b:]).mean() + ref.cross_entropy(s_np[b:], t_np[:b]).mean()) / 2
    np.testing.assert_allclose(glob.item(), expected, rtol=1e-5)
    glob.backward()
    # d/ds of CE(s/T) is (softmax(s/T) - t)/T, scaled by 1/(B * n_terms); view0 rows pair with teacher view1
    grad = (torch.softmax(s_global.detach() / 0.1, -1) - torch.cat([t[b:], t[:b]])) / 0.1 / (b * 2)
    torch.testing.assert_close(s_global.grad, grad)


def test_dino_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2B"):
        dino_loss(randn(6, 4, seed=0), None, probs(4, 4, seed=0))
    with pytest.raises(ValueError, match="multiple of B"):
        dino_loss(randn(4, 4, seed=0), randn(5, 4, seed=0), probs(4, 4, seed=0))


def test_ibot_loss_matches_per_image_masked_mean():
    two_b, n_tok, k = 6, 10, 7
    mask = torch.rand(two_b, n_tok, generator=torch.Generator().manual_seed(7)) < 0.4
    mask[1] = False  # an image without masks still counts in the denominator
    mask[2] = True
    s_all, t_all = randn(two_b, n_tok, k, seed=8), probs(two_b, n_tok, k, seed=9)

    # DINOv2's collate: weight 1/|M_i| for each masked token of image i, in flat mask order
    weights = (1 / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(mask)[mask]
    out = ibot_loss(s_all[mask], t_all[mask], weights, n_images=two_b, student_temp=0.1)

    total = 0.0
    for i in range(two_b):
        rows = mask[i].numpy()
        if rows.any():
            total += ref.cross_entropy(s_all[i].double().numpy()[rows], t_all[i].double().numpy()[rows], 0.1).mean()
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.item(), total / two_b, rtol=1e-5)


def test_ibot_loss_rejects_mismatched_weights():
    with pytest.raises(ValueError, match=r"\(M,\)"):
        ibot_loss(randn(5, 3, seed=0), probs(5, 3, seed=0), torch.ones(4), n_images=2)


def koleo_reference(x: np.ndarray, eps: float = 1e-8) -> float:
    """Brute force: nearest other row by Euclidean distance, then PairwiseDistance's ||a - b + eps||."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    n = len(x)
    logs = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        j = min(others, key=lambda j: np.linalg.norm(x[i] - x[j]))
        logs.append(math.log(np.linalg.norm(x[i] - x[j] + eps) + eps))
    return -float(np.mean(logs))


def test_koleo_matches_brute_force_reference():
    x = randn(16, 12, seed=10)
    out = koleo_loss(x)
    assert out.dtype == torch.float32 and out.shape == ()
    np.testing.assert_allclose(out.item(), koleo_reference(x.double().numpy()), rtol=1e-5)


def test_koleo_distance_is_torch_pairwise_distance():
    """DINOv2 uses nn.PairwiseDistance(2, eps=1e-8), which is ||a - b + eps||, not ||a - b|| + eps."""
    a, b = randn(5, 7, seed=11), randn(5, 7, seed=12)
    pd = torch.nn.PairwiseDistance(2, eps=1e-8)
    torch.testing.assert_close(pd(a, b), (a - b + 1e-8).norm(dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(pd(a, a), torch.full((5,), 1e-8 * math.sqrt(7)))
    x = torch.nn.functional.normalize(randn(9, 7, seed=13), dim=-1)
    dots = x @ x.t()
    dots.view(-1)[::10].fill_(-1)  # DINOv2's diagonal trick
    nn_idx = dots.argmax(dim=1)
    torch.testing.assert_close(koleo_loss(x), -torch.log(pd(x, x[nn_idx]) + 1e-8).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_koleo_duplicates_give_finite_loss_and_gradients(dtype):
    x = randn(6, 32, seed=14)
    x[3] = x[0]  # e.g. the same image twice in a batch
    x = x.to(dtype).requires_grad_()
    out = koleo_loss(x)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    np.testing.assert_allclose(out.item(), koleo_reference(x.detach().double().numpy()), rtol=1e-3)
    # the duplicate pair contributes -log(eps * sqrt(D) + eps) = 16.5 each, the other rows about -log(1.3)
    assert 5.0 < out.item() < 2 * (-math.log(1e-8 * math.sqrt(32) + 1e-8)) / 6
    out.backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_koleo_fewer_than_two_rows_is_zero_with_a_gradient_path():
    for n in (0, 1):
        x = randn(n, 4, seed=15).requires_grad_()
        out = koleo_loss(x)
        assert out.item() == 0.0
        out.backward()
        assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_koleo_ignores_autocast_and_handles_antipodal_pair():
    x = randn(10, 8, seed=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = koleo_loss(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, koleo_loss(x), rtol=0, atol=0)
    # two opposite vectors: each is the other's neighbour at distance 2, never itself
    pair = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])
    np.testing.assert_allclose(koleo_loss(pair).item(), -math.log(2.0), rtol=1e-6)

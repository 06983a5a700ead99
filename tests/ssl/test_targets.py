"""Teacher targets: centering (with DINOv2's one-step lag) and Sinkhorn-Knopp, single process."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.ssl import reference as ref
from vitreg.ssl.targets import Centering, sinkhorn_knopp


def logits(n: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


def test_centering_targets_are_a_centered_sharpened_softmax_in_fp32():
    c = Centering(7)
    with torch.no_grad():
        c.center.copy_(torch.linspace(-1, 1, 7)[None])
    t = logits(5, 7, 0)
    out = c.targets(t.half(), temp=0.04)
    assert out.dtype == torch.float32 and not out.requires_grad
    expected = ref.softmax((t.half().double().numpy() - c.center.double().numpy()) / 0.04)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.sum(-1).numpy(), 1.0, rtol=1e-6)


def test_centering_update_is_an_ema_of_the_batch_mean():
    c = Centering(6, momentum=0.8)
    assert c.center.dtype == torch.float32 and torch.count_nonzero(c.center) == 0
    a, b = logits(4, 6, 1), logits(9, 6, 2)
    c.update(a)
    c.update(b.half())
    ma, mb = a.double().numpy().mean(0), b.half().double().numpy().mean(0)
    np.testing.assert_allclose(c.center.numpy()[0], 0.8 * (0.2 * ma) + 0.2 * mb, rtol=1e-5, atol=1e-6)
    assert "center" in c.state_dict() and torch.equal(copy.deepcopy(c).center, c.center)


def test_targets_then_update_reproduces_dinov2_lazy_center_update():
    """DINOv2: each call first applies the *previous* step's pending update, then computes the targets."""
    k, temp, m = 8, 0.07, 0.9
    batches = [logits(n, k, 10 + i, scale=3.0) for i, n in enumerate((6, 4, 6, 10, 2))]

    # DINOv2's scheme, by hand: softmax_center_teacher (apply pending, then softmax), then update_center (pend)
    center, pending, dinov2_targets = np.zeros(k), None, []
    for t in batches:
        t = t.double().numpy()
        if pending is not None:
            center = m * center + (1 - m) * pending
        dinov2_targets.append(ref.softmax((t - center) / temp))
        pending = t.sum(0) / len(t)

    c = Centering(k, momentum=m)
    for i, t in enumerate(batches):
        np.testing.assert_allclose(c.targets(t, temp).numpy(), dinov2_targets[i], rtol=1e-5, atol=1e-7)
        c.update(t)
    # step 0 really used center 0 (an update-first order would already have moved it)
    np.testing.assert_allclose(dinov2_targets[0], ref.softmax(batches[0].double().numpy() / temp), rtol=1e-12)
    # between steps our center is DINOv2's with the pending update applied
    np.testing.assert_allclose(c.center.numpy()[0], m * center + (1 - m) * pending, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_iterations", [1, 3])
def test_sinkhorn_knopp_matches_float64_reference(n_iterations):
    t = logits(12, 30, 3)
    out = sinkhorn_knopp(t, temp=0.05, n_iterations=n_iterations)
    assert out.shape == (12, 30) and out.dtype == torch.float32
    expected = ref.sinkhorn_knopp(t.double().numpy(), 0.05, n_iterations)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-8)
    # each sample's target is a distribution: the SK columns (our rows) sum to 1
    np.testing.assert_allclose(out.sum(-1).numpy(), 1.0, rtol=1e-5)


def test_sinkhorn_knopp_balances_prototypes_and_accepts_fp16_and_counts():
    t = logits(64, 16, 4)
    out = sinkhorn_knopp(t.half(), temp=0.5, n_iterations=20)
    assert out.dtype == torch.float32
    # after many iterations every prototype receives n/K of the mass
    np.testing.assert_allclose(out.sum(0).numpy(), 64 / 16, rtol=1e-3)
    default = sinkhorn_knopp(t, 0.1)
    for count in (64, torch.tensor(64), torch.tensor([64])):
        torch.testing.assert_close(sinkhorn_knopp(t, 0.1, total_count=count), default)
    # in one process B is only a common scale (the final Q *= B undoes it); it matters across ranks
    torch.testing.assert_close(sinkhorn_knopp(t, 0.1, total_count=128), default)


def test_sinkhorn_knopp_does_not_modify_its_input():
    t = logits(5, 6, 5)
    before = t.clone()
    sinkhorn_knopp(t, 0.1)
    assert torch.equal(t, before)


def test_centering_with_no_rows_keeps_the_centre():
    from vitreg.ssl.targets import Centering

    c = Centering(4, momentum=0.9)
    c.center.fill_(0.5)
    c.update(torch.zeros(0, 4))  # a batch whose iBOT masks are all empty
    assert torch.equal(c.center, torch.full((1, 4), 0.5))
    c.update(torch.ones(3, 4))
    torch.testing.assert_close(c.center, torch.full((1, 4), 0.9 * 0.5 + 0.1))


def test_a_staged_centre_update_waits_for_commit_and_can_be_discarded():
    """The module commits the centre only once a step is accepted; a skipped step discards it."""
    a, b = logits(4, 6, 1), logits(5, 6, 2)
    reference = Centering(6, momentum=0.8)
    reference.update(a)
    reference.update(b)

    c = Centering(6, momentum=0.8)
    c.stage_update(a)
    assert torch.count_nonzero(c.center) == 0  # nothing moves before the commit
    torch.testing.assert_close(c.next_center, 0.2 * a.mean(0, keepdim=True))
    c.commit()
    c.stage_update(torch.full((3, 6), float("nan")))  # a poisoned batch...
    c.discard()  # ... whose step is skipped
    assert torch.isfinite(c.center).all() and torch.equal(c.next_center, c.center)
    c.stage_update(b)
    c.commit()
    assert torch.equal(c.center, reference.center)  # bitwise: update() is stage + commit
    c.commit()  # nothing pending: no change
    assert torch.equal(c.center, reference.center)
    assert list(c.state_dict()) == ["center"]  # a pending update is never checkpointed

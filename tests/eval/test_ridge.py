"""Closed-form ridge, ridge classifier and logistic regression against known answers and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitreg.eval.ridge import (
    accuracy,
    classify,
    fit_ridge,
    fit_ridge_path,
    log_grid,
    logistic_fit,
    logistic_regression,
    predict,
    ridge_classifier,
    select_alpha,
)


def numpy_ridge(X: np.ndarray, Y: np.ndarray, alpha: float, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations straight from the formula, in numpy float64."""
    mean = X.mean(0)
    scale = X.std(0) if standardize else np.ones(X.shape[1])
    Xs = (X - mean) / scale
    Yc = Y - Y.mean(0)
    Ws = np.linalg.solve(Xs.T @ Xs + alpha * np.eye(X.shape[1]), Xs.T @ Yc)
    W = Ws / scale[:, None]
    return W, Y.mean(0) - mean @ W


@pytest.mark.parametrize("standardize", [True, False])
def test_recovers_a_planted_linear_map_exactly(standardize):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 8, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10, 8, dtype=torch.float64) + 3
    W_true = torch.randn(8, 3, generator=g, dtype=torch.float64)
    b_true = torch.randn(3, generator=g, dtype=torch.float64)
    W, b = fit_ridge(X, X @ W_true + b_true, alpha=1e-10, standardize=standardize)
    torch.testing.assert_close(W, W_true, atol=1e-7, rtol=0)
    torch.testing.assert_close(b, b_true, atol=1e-7, rtol=0)
    torch.testing.assert_close(predict(X, W, b), X @ W_true + b_true, atol=1e-7, rtol=0)


@pytest.mark.parametrize("standardize", [True, False])
def test_matches_numpy_normal_equations(standardize):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 6)) * np.array([1, 2, 5, 0.1, 1, 3]) + 2
    Y = rng.normal(size=(40, 4))
    W_ref, b_ref = numpy_ridge(X, Y, 3.0, standardize)
    W, b = fit_ridge(torch.from_numpy(X).float(), torch.from_numpy(Y), 3.0, standardize=standardize)
    # float32 input rounds X once; the solve itself is float64
    W64, b64 = fit_ridge(torch.from_numpy(X), torch.from_numpy(Y), 3.0, standardize=standardize)
    np.testing.assert_allclose(W64.numpy(), W_ref, atol=1e-12)
    np.testing.assert_allclose(b64.numpy(), b_ref, atol=1e-12)
    np.testing.assert_allclose(W.numpy(), W_ref, atol=1e-5)
    assert W.dtype == torch.float64 and b.shape == (4,)


def test_one_dimensional_targets_give_vector_weights():
    X = torch.randn(20, 3, dtype=torch.float64)
    W, b = fit_ridge(X, X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 4, 1e-12)
    assert W.shape == (3,) and b.shape == ()
    torch.testing.assert_close(W, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    assert float(b) == pytest.approx(4.0)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_primal_dual_and_path_agree(shape):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    Y = torch.randn(shape[0], 5, generator=g, dtype=torch.float64)
    for alpha in (0.01, 1.0, 100.0):
        Wp, bp = fit_ridge(X, Y, alpha, solver="primal")
        Wd, bd = fit_ridge(X, Y, alpha, solver="dual")
        torch.testing.assert_close(Wp, Wd, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(bp, bd, atol=1e-9, rtol=1e-9)
    path = fit_ridge_path(X, Y, [0.01, 1.0, 100.0])
    for alpha, (W, b) in zip([0.01, 1.0, 100.0], path, strict=True):
        W_ref, b_ref = fit_ridge(X, Y, alpha)
        torch.testing.assert_close(W, W_ref, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(b, b_ref, atol=1e-8, rtol=1e-8)


def test_zero_alpha_on_a_singular_system_falls_back_to_least_squares():
    X = torch.randn(10, 4, dtype=torch.float64)
    X = torch.cat([X, X[:, :1]], dim=1)  # duplicated column: X^T X is singular
    Y = X[:, :4] @ torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    W, b = fit_ridge(X, Y, 0.0, standardize=False)
    torch.testing.assert_close(predict(X, W, b), Y, atol=1e-8, rtol=0)


def test_ridge_classifier_separates_clusters():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(5, 10, generator=g) * 5
    y = torch.arange(5).repeat(20)
    X = centres[y] + 0.1 * torch.randn(100, 10, generator=g)
    W, b = ridge_classifier(X, y, alpha=1.0)
    assert W.shape == (10, 5)
    assert accuracy(X, y, W, b) == 1.0
    assert torch.equal(classify(X, W, b), y)


def test_logistic_regression_is_perfect_on_separable_data():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(4, 6, generator=g) * 4
    y = torch.arange(4).repeat(15)
    X = centres[y] + 0.2 * torch.randn(60, 6, generator=g)
    W, b = logistic_regression(X, y, C=10.0)
    assert accuracy(X, y, W, b) == 1.0


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0])
def test_logistic_regression_matches_a_one_dimensional_hand_solution(C):
    """Two classes, x = -1 (labels 0, 0, 1) and x = +1 (labels 1, 1, 0). The data are symmetric under
    (x, y) -> (-x, 1 - y), so b1 = b0 and w0 = -w1 = -beta / 2, where beta solves the stationarity
    condition of C * sum CE + (w0^2 + w1^2) / 2:  C * (6 sigmoid(beta) - 4) + beta / 2 = 0."""
    X = torch.tensor([[-1.0], [-1.0], [-1.0], [1.0], [1.0], [1.0]])
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    lo, hi = 0.0, 10.0  # the left side is increasing in beta: bisection
    for _ in range(200):
        mid = (lo + hi) / 2
        if C * (6 / (1 + math.exp(-mid)) - 4) + mid / 2 < 0:
            lo = mid
        else:
            hi = mid
    beta = (lo + hi) / 2
    W, b = logistic_regression(X, y, C=C, standardize=False, tol=1e-12)
    assert float(W[0, 1] - W[0, 0]) == pytest.approx(beta, abs=1e-6)
    assert float(W[0, 0] + W[0, 1]) == pytest.approx(0.0, abs=1e-6)
    assert float(b[1] - b[0]) == pytest.approx(0.0, abs=1e-6)
    if C == 10.0:
        assert beta == pytest.approx(math.log(2), abs=0.05)  # nearly unpenalised: sigmoid(beta) -> 2/3


def test_select_alpha_prefers_little_penalty_for_clean_data_and_much_for_noise():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    clean = X @ torch.randn(5, generator=g, dtype=torch.float64)
    noise = torch.randn(60, generator=g, dtype=torch.float64)
    grid = log_grid(-3, 4, 8)
    assert select_alpha(X, clean, grid)[0] == grid[0]
    assert select_alpha(X, noise, grid)[0] >= 100.0


def test_select_alpha_keeps_each_group_inside_one_fold():
    X = torch.randn(40, 3, dtype=torch.float64)
    Y = torch.randn(40, dtype=torch.float64)
    groups = torch.arange(40) // 4  # 10 groups of 4 rows
    seen = []

    def spy_fit(x, y, alpha):
        seen.append({int(i) for i in x[:, 0].mul(1e6).round()})
        return fit_ridge(x, y, alpha)

    def spy_score(x, y, W, b):
        held_out = {int(i) for i in x[:, 0].mul(1e6).round()}
        assert not held_out & seen[-1]
        # a group is either wholly held out or wholly in training
        rows = {int(v) for v in X[:, 0].mul(1e6).round()}
        for gid in range(10):
            members = {int(v) for v in X[groups == gid, 0].mul(1e6).round()}
            assert members <= held_out or members <= (rows - held_out)
        return 0.0

    best, means = select_alpha(X, Y, [1.0, 2.0], fit=spy_fit, score=spy_score, folds=3, groups=groups)
    assert len(seen) == 6 and means == [0.0, 0.0] and best == 1.0


def test_select_alpha_tunes_logistic_c():
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(3, 4, generator=g) * 3
    y = torch.arange(3).repeat(10)
    X = centres[y] + 0.3 * torch.randn(30, 4, generator=g)
    best, means = select_alpha(X, y, [1e-4, 1.0], fit=logistic_fit(3), score=accuracy)
    assert best == 1.0 and means[1] == 1.0


def test_bad_inputs_raise_clear_errors():
    X = torch.randn(10, 3)
    with pytest.raises(ValueError, match="targets"):
        fit_ridge(X, torch.randn(9), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        fit_ridge(X, torch.randn(10), -1.0)
    with pytest.raises(ValueError, match="solver"):
        fit_ridge(X, torch.randn(10), 1.0, solver="qr")
    with pytest.raises(ValueError, match="integer"):
        ridge_classifier(X, torch.rand(10), 1.0)
    with pytest.raises(ValueError, match="C must be"):
        logistic_regression(X, torch.zeros(10, dtype=torch.long), C=0.0)
    with pytest.raises(ValueError, match="groups"):
        select_alpha(X, torch.randn(10), [1.0], groups=torch.zeros(10), folds=3)

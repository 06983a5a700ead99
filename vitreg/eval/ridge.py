"""Closed-form linear probes in float64: ridge regression, ridge classifier, L2 logistic regression.

Every fit standardises its features first (per-feature mean 0, std 1 on the training rows; a
feature with zero spread keeps scale 1) and centres the targets, so the penalty acts on the
standardised coefficients and the bias is never penalised. The returned ``(W, b)`` are mapped back
to the raw feature space, so ``predict(X, W, b) = X @ W + b`` needs no preprocessing. Pass
``standardize=False`` for the textbook objective on raw features (DINOv2's log-regression eval
does not standardise; its C therefore means something else for the same data).

Objectives (``Xs``: standardised rows, ``Yc``: centred targets):

- ridge: ``min ||Xs W - Yc||^2 + alpha ||W||^2``; solved from the D x D normal equations
  ``(Xs^T Xs + alpha I) W = Xs^T Yc`` (primal) or, when there are fewer rows than features, the
  N x N system ``W = Xs^T (Xs Xs^T + alpha I)^-1 Yc`` (dual). Both by Cholesky, with a
  least-squares fallback when the system is singular (``alpha = 0``).
- ridge classifier: ridge on one-hot targets, prediction = argmax.
- logistic regression: multinomial softmax, ``min C * sum_i CE_i + 1/2 ||W||^2`` (scikit-learn's
  convention for C), bias unpenalised, full-batch L-BFGS with strong-Wolfe line search.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

SOLVERS = ("auto", "primal", "dual")

FitFn = Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor]]
ScoreFn = Callable[[Tensor, Tensor, Tensor, Tensor], float]


def _check_rows(X: Tensor, Y: Tensor, what: str) -> None:
    if X.ndim != 2:
        raise ValueError(f"{what}: features must be a 2-D (N, D) tensor, got shape {tuple(X.shape)}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"{what}: {X.shape[0]} feature rows but {Y.shape[0]} targets; pass one target per row")
    if X.shape[0] < 2:
        raise ValueError(f"{what}: needs at least 2 training rows, got {X.shape[0]}")


def _standardizer(X: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    """Per-feature mean and scale of the training rows (scale 1 for constant features or when off)."""
    mean = X.mean(0)
    if not standardize:
        return mean, torch.ones_like(mean)
    std = X.std(0, unbiased=False)
    return mean, torch.where(std > 1e-12 * std.max().clamp(min=1e-300), std, torch.ones_like(std))


def _spd_solve(A: Tensor, B: Tensor) -> Tensor:
    """``A^-1 B`` for symmetric positive (semi-)definite ``A``: Cholesky, else least squares."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.lstsq(A, B, driver="gelsd").solution


def _centred(X: Tensor, Y: Tensor, standardize: bool):
    """Standardised float64 features, centred 2-D targets, and the map from a solution on those back to
    ``(W, b)`` in raw coordinates (the bias absorbs the centring, so it is never penalised)."""
    X, Y = X.double(), Y.double()
    squeeze = Y.ndim == 1
    Y2 = Y[:, None] if squeeze else Y
    mean, scale = _standardizer(X, standardize)
    y_mean = Y2.mean(0)

    def raw(Ws: Tensor) -> tuple[Tensor, Tensor]:
        W = Ws / scale[:, None]
        b = y_mean - mean @ W
        return (W[:, 0], b[0]) if squeeze else (W, b)

    return (X - mean) / scale, Y2 - y_mean, raw


def fit_ridge(
    X: Tensor, Y: Tensor, alpha: float, *, standardize: bool = True, solver: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Ridge regression ``Y ~ X @ W + b`` (float64). ``Y`` is (N,) or (N, K); returns ``W`` (D, K) or
    (D,) and ``b`` (K,) or (), in raw feature coordinates."""
    _check_rows(X, Y, "fit_ridge")
    if alpha < 0:
        raise ValueError(f"fit_ridge: alpha must be >= 0, got {alpha}")
    if solver not in SOLVERS:
        raise ValueError(f"fit_ridge: solver must be one of {SOLVERS}, got {solver!r}")
    Xs, Yc, raw = _centred(X, Y, standardize)
    n, d = Xs.shape
    if solver == "dual" or (solver == "auto" and n < d):
        gram = Xs @ Xs.T
        gram.diagonal().add_(alpha)
        Ws = Xs.T @ _spd_solve(gram, Yc)
    else:
        gram = Xs.T @ Xs
        gram.diagonal().add_(alpha)
        Ws = _spd_solve(gram, Xs.T @ Yc)
    return raw(Ws)


def fit_ridge_path(
    X: Tensor, Y: Tensor, alphas: Sequence[float], *, standardize: bool = True
) -> list[tuple[Tensor, Tensor]]:
    """``fit_ridge`` for every value in ``alphas`` from one eigendecomposition of the Gram matrix
    (D x D, or N x N when N < D), so a sweep costs little more than one fit."""
    _check_rows(X, Y, "fit_ridge_path")
    if any(a < 0 for a in alphas):
        raise ValueError(f"fit_ridge_path: every alpha must be >= 0, got {list(alphas)}")
    Xs, Yc, raw = _centred(X, Y, standardize)
    n, d = Xs.shape
    dual = n < d
    evals, evecs = torch.linalg.eigh(Xs @ Xs.T if dual else Xs.T @ Xs)
    evals = evals.clamp(min=0.0)  # round-off can leave tiny negatives in a PSD matrix
    projected = evecs.T @ Yc if dual else evecs.T @ (Xs.T @ Yc)
    fits = []
    for alpha in alphas:
        inv = 1.0 / (evals + alpha)
        if alpha == 0:
            inv = torch.where(evals > 1e-12 * evals.max(), inv, torch.zeros_like(inv))  # pseudo-inverse
        Ws = evecs @ (inv[:, None] * projected)
        if dual:
            Ws = Xs.T @ Ws
        fits.append(raw(Ws))
    return fits


def predict(X: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``X @ W + b`` in float64."""
    return X.double() @ W + b


def classify(X: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """Class index with the highest score (ridge outputs or logits)."""
    return predict(X, W, b).argmax(-1)


def _labels(y: Tensor, num_classes: int | None, what: str) -> tuple[Tensor, int]:
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be a 1-D integer tensor, got {y.dtype} of shape {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{what}: labels must be >= 0, got {int(y.min())}")
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if y.numel() and int(y.max()) >= k:
        raise ValueError(f"{what}: label {int(y.max())} >= num_classes={k}; pass the true number of classes")
    return y.long(), k


def ridge_classifier(
    X: Tensor, y: Tensor, alpha: float, *, num_classes: int | None = None, standardize: bool = True
) -> tuple[Tensor, Tensor]:
    """Ridge regression on one-hot targets (0/1); predict with ``classify``. Returns ``W`` (D, K), ``b`` (K,)."""
    y, k = _labels(y, num_classes, "ridge_classifier")
    onehot = torch.nn.functional.one_hot(y, k).double()
    return fit_ridge(X, onehot, alpha, standardize=standardize)


def logistic_regression(
    X: Tensor,
    y: Tensor,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    num_classes: int | None = None,
    standardize: bool = True,
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Multinomial L2-penalised logistic regression (``C * sum CE + ||W||^2 / 2``) by L-BFGS in float64.

    Stops when the largest gradient entry of the mean-form objective is below ``tol``, when the loss
    or the step changes by less than ``1e-4 * tol``, or after ``max_iter`` iterations. Returns ``W`` (D, K) and ``b`` (K,) in raw
    feature coordinates; logits are ``X @ W + b``."""
    _check_rows(X, torch.as_tensor(y), "logistic_regression")
    if C <= 0:
        raise ValueError(f"logistic_regression: C must be > 0 (inverse penalty strength), got {C}")
    y, k = _labels(y, num_classes, "logistic_regression")
    X = X.double()
    mean, scale = _standardizer(X, standardize)
    Xs = (X - mean) / scale
    n, d = Xs.shape
    Ws = torch.zeros(d, k, dtype=torch.float64, requires_grad=True)
    # start the unpenalised bias at the log class frequencies (its optimum when W = 0): the bias is
    # much less curved than the penalised weights, and L-BFGS would otherwise crawl towards it
    prior = (torch.bincount(y, minlength=k).double() + 1e-3) / n
    bs = prior.log().requires_grad_()
    # the mean form of the same objective keeps gradients O(1) whatever N is
    penalty = 1.0 / (2.0 * C * n)
    optimizer = torch.optim.LBFGS(
        [Ws, bs],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-4 * tol,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(Xs @ Ws + bs, y) + penalty * Ws.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    W = Ws.detach() / scale[:, None]
    return W, bs.detach() - mean @ W


# ------------------------------------------------------------------------------------------ selection


def neg_mse(X: Tensor, Y: Tensor, W: Tensor, b: Tensor) -> float:
    """Minus the mean squared error (higher is better), the default selection score for ridge."""
    return -float((predict(X, W, b) - Y.double()).pow(2).mean())


def accuracy(X: Tensor, y: Tensor, W: Tensor, b: Tensor) -> float:
    """Top-1 accuracy (0..1) of ``classify``; ``y`` holds labels (N,) or one-hot rows (N, K)."""
    y = torch.as_tensor(y)
    labels = y.argmax(-1) if y.ndim == 2 else y
    return float((classify(X, W, b) == labels).double().mean())


def log_grid(low: float, high: float, count: int) -> list[float]:
    """``count`` values from ``10**low`` to ``10**high``, evenly spaced in log10."""
    return [float(v) for v in torch.logspace(low, high, count, dtype=torch.float64)]


def _folds(n: int, folds: int, groups: Tensor | None, seed: int) -> list[Tensor]:
    """Boolean validation masks; rows of one group always land in the same fold."""
    ids = torch.arange(n) if groups is None else torch.as_tensor(groups).long()
    if ids.shape != (n,):
        raise ValueError(f"select_alpha: groups must have one entry per row ({n}), got shape {tuple(ids.shape)}")
    unique, inverse = torch.unique(ids, return_inverse=True)
    if len(unique) < folds:
        raise ValueError(f"select_alpha: {len(unique)} groups cannot make {folds} folds; lower `folds`")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    fold_of_group = torch.empty(len(unique), dtype=torch.long)
    fold_of_group[order] = torch.arange(len(unique)) % folds
    fold_of_row = fold_of_group[inverse]
    return [fold_of_row == f for f in range(folds)]


def select_alpha(
    X: Tensor,
    Y: Tensor,
    alphas: Sequence[float],
    *,
    fit: FitFn | None = None,
    score: ScoreFn = neg_mse,
    folds: int = 3,
    groups: Tensor | None = None,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """The regularisation value in ``alphas`` with the best mean k-fold ``score`` (ties: the first).

    ``fit(X, Y, value) -> (W, b)`` and ``score(X, Y, W, b) -> float`` (higher is better) make it work
    for any probe here, e.g. ``fit=logistic_fit(num_classes)``, ``score=accuracy``. The default ``fit``
    is ridge through ``fit_ridge_path`` (one eigendecomposition per fold); a ridge classifier is
    ridge on one-hot ``Y`` with ``score=accuracy``.
    ``groups`` (one id per row, e.g. the image index of each token) keeps a group inside one fold, so
    tokens of one image never sit on both sides. Returns the best value and the mean score of each.
    """
    if not alphas:
        raise ValueError("select_alpha: `alphas` is empty; pass a grid such as log_grid(-3, 3, 7)")
    if folds < 2:
        raise ValueError(f"select_alpha: folds must be >= 2, got {folds}")
    masks = _folds(X.shape[0], folds, groups, seed)
    per_fold = []  # per_fold[f][i]: score of alphas[i] on fold f
    for m in masks:
        train_x, train_y = X[~m], Y[~m]
        fits = fit_ridge_path(train_x, train_y, alphas) if fit is None else [fit(train_x, train_y, a) for a in alphas]
        per_fold.append([score(X[m], Y[m], W, b) for W, b in fits])
    means = [sum(fold[i] for fold in per_fold) / len(per_fold) for i in range(len(alphas))]
    best = max(range(len(alphas)), key=lambda i: (means[i], -i))
    return float(alphas[best]), means


def logistic_fit(num_classes: int, max_iter: int = 1000, standardize: bool = True) -> FitFn:
    """``fit`` for ``select_alpha`` where the swept value is logistic regression's C."""
    return functools.partial(_logistic_fit, num_classes=num_classes, max_iter=max_iter, standardize=standardize)


def _logistic_fit(X: Tensor, y: Tensor, C: float, *, num_classes: int, max_iter: int, standardize: bool):
    return logistic_regression(X, y, C=C, max_iter=max_iter, num_classes=num_classes, standardize=standardize)

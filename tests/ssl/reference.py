"""Float64 numpy references written from the DINOv2 formulas, independent of the code under test."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(student: np.ndarray, teacher: np.ndarray, student_temp: float = 0.1) -> np.ndarray:
    """Per-row -sum_k t_k log softmax(s / T)_k, one row at a time."""
    return np.array([-(t * log_softmax(s / student_temp)).sum() for s, t in zip(student, teacher, strict=True)])


def sinkhorn_knopp(logits: np.ndarray, temp: float, n_iterations: int = 3) -> np.ndarray:
    """Single-process SK on the whole batch (n, K); B = n."""
    q = np.exp(logits / temp).T  # (K, n)
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T

"""Weighted kNN against a direct per-query reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitreg.eval.knn import knn_accuracy


def reference_knn(train, train_labels, test, k, t):
    preds = []
    for q in test:
        sims = [(float(q @ x), int(y)) for x, y in zip(train, train_labels, strict=True)]
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for sim, y in sims[:k]:
            votes[y] = votes.get(y, 0.0) + math.exp(sim / t)
        preds.append(max(votes, key=votes.get))
    return torch.tensor(preds)


def test_matches_reference_vote():
    torch.manual_seed(0)
    train = F.normalize(torch.randn(60, 8), dim=1)
    test = F.normalize(torch.randn(25, 8), dim=1)
    train_labels, test_labels = torch.randint(0, 4, (60,)), torch.randint(0, 4, (25,))
    for k, t in [(1, 0.07), (5, 0.07), (20, 0.5)]:
        expected = (reference_knn(train, train_labels, test, k, t) == test_labels).float().mean().item()
        assert knn_accuracy(train, train_labels, test, test_labels, k, t, chunk=7) == pytest.approx(expected)


def test_separable_clusters_are_perfectly_classified():
    centers = F.normalize(torch.randn(3, 16), dim=1)
    labels = torch.arange(3).repeat_interleave(10)
    feats = F.normalize(centers[labels] + 0.01 * torch.randn(30, 16), dim=1)
    assert knn_accuracy(feats, labels, feats, labels, k=5) == 1.0

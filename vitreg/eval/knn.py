"""Weighted k-nearest-neighbour classification on frozen, L2-normalised features (DINO's protocol:
cosine similarity, top-k neighbours voting with weight exp(sim / T))."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """L2-normalised CLS features (``x_norm_clstoken``) and labels of every (images, labels) batch."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, y in batches:
        out = backbone.forward_features(images.to(device, non_blocking=True))
        feats.append(F.normalize(out["x_norm_clstoken"].float(), dim=-1).cpu())
        labels.append(torch.as_tensor(y).cpu())
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (0–1) of the weighted kNN vote; features must already be L2-normalised."""
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("kNN needs at least one training and one test feature")
    k = min(k, len(train_feats))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test_feats), chunk):
        sims = test_feats[start : start + chunk] @ train_feats.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return correct / len(test_feats)

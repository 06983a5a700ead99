"""DINOv2's weighted k-nearest-neighbour classifier on frozen features (``dinov2/eval/knn.py``).

The rule, for each test feature (all features L2-normalised, so similarity is cosine):

1. take the ``k_max = max(ks)`` most similar training features, sorted by similarity ``s_1 >= s_2 >= ...``;
2. weight them ``w = softmax(s / T)`` over those ``k_max`` (T = 0.07);
3. for each ``k`` in ``ks``, class scores = sum over the first ``k`` neighbours of ``one_hot(label) * w``;
   top-1 / top-5 accuracy (micro, in percent) from those scores.

The softmax normalises over ``k_max`` neighbours, not ``k``, as in DINOv2; that scales each query's
scores by one positive constant and so never changes a prediction.

Distributed like DINOv2: the training bank is sharded (each rank passes only its own rows) and never
gathered; the whole test set, identical on every rank, is processed in chunks: each rank finds the
top ``k_max`` of the chunk in its shard, the candidates of all ranks are gathered, and a second top-k
picks the global neighbours. The result equals one process holding the whole bank.

Top-5 needs at least 5 classes: with fewer, ``top5`` is ``None``. A class that no neighbour voted for
never counts as a top-5 hit. (DINOv2's torchmetrics top-5 fills the five places with such zero-score
classes in ``topk``'s arbitrary tie order when fewer than five classes got votes, e.g. k=1 or k=10 with
few distinct neighbour labels, so it can count a hit that no neighbour supports.) A ``k`` larger than the (global) bank
is clamped to the bank size with a warning; results stay keyed by the requested ``k``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitreg.eval.features import extract_features as _extract_probe_features
from vitreg.utils.distributed import all_gather_cat, all_reduce_many_, is_distributed

DEFAULT_KS = (10, 20, 100, 200)


@dataclass
class KNNSettings:
    """The ``knn`` section of conf/analyze.yaml: DINOv2's weighted kNN (cosine, softmax(sim / T) votes)."""

    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    temperature: float = 0.07


def _checked_ks(ks: Sequence[int] | int) -> list[int]:
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return [int(k) for k in ks]


def _global_count(n: int, device: torch.device, use_dist: bool, op: str = "sum") -> int:
    value = torch.tensor([n], dtype=torch.long, device=device)
    if use_dist:
        all_reduce_many_([value], op)
    return int(value)


def _setup(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor | None,
    ks: Sequence[int] | int,
    temperature: float,
    num_classes: int | None,
    distributed: bool | None,
) -> tuple[Tensor, Tensor, dict[int, int], int, bool]:
    """Validated inputs: (normalised bank, its labels, requested k -> effective k, num_classes, use_dist)."""
    ks = _checked_ks(ks)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    use_dist = is_distributed() if distributed is None else (distributed and is_distributed())
    if train_feats.dim() != 2 or test_feats.dim() != 2:
        raise ValueError(
            f"features must be (N, D), got train {tuple(train_feats.shape)} and test {tuple(test_feats.shape)}"
        )
    if len(train_feats) != len(train_labels) or (test_labels is not None and len(test_feats) != len(test_labels)):
        raise ValueError("kNN: features and labels have different lengths")
    if train_feats.shape[1] != test_feats.shape[1] and len(train_feats):
        raise ValueError(f"kNN: train features have dim {train_feats.shape[1]}, test features {test_feats.shape[1]}")
    device = train_feats.device
    bank = F.normalize(train_feats.float(), dim=1)
    bank_labels = train_labels.to(device=device, dtype=torch.long)
    n_bank = _global_count(len(bank), device, use_dist)
    if n_bank == 0 or len(test_feats) == 0:
        raise ValueError(f"kNN needs training and test features, got {n_bank} training and {len(test_feats)} test")
    if use_dist:
        low, high = (_global_count(len(test_feats), device, True, op) for op in ("min", "max"))
        if low != high:
            raise ValueError(f"kNN: every rank must pass the whole test set, got between {low} and {high} rows")
    if (len(bank_labels) and int(bank_labels.min()) < 0) or (test_labels is not None and int(test_labels.min()) < 0):
        raise ValueError("kNN: labels must be >= 0 (an unlabelled sample got into the evaluation set?)")
    local_top = max(
        int(bank_labels.max()) if len(bank_labels) else -1, int(test_labels.max()) if test_labels is not None else -1
    )
    top_label = _global_count(local_top, device, use_dist, "max")
    if num_classes is None:
        num_classes = top_label + 1
    elif top_label >= num_classes:
        raise ValueError(f"kNN: label {top_label} is out of range for num_classes={num_classes}")
    effective = {}
    for k in ks:
        effective[k] = min(k, n_bank)
        if k > n_bank:
            warnings.warn(f"kNN: k={k} is larger than the {n_bank} training samples; using k={n_bank}", stacklevel=3)
    return bank, bank_labels, effective, num_classes, use_dist


def _neighbours(query: Tensor, bank: Tensor, bank_labels: Tensor, k_max: int, use_dist: bool) -> tuple[Tensor, Tensor]:
    """Similarities (Q, k_max), sorted descending, and labels of the global top ``k_max`` neighbours."""
    k_local = min(k_max, len(bank))
    sims, idx = (query @ bank.T).topk(k_local, dim=1, largest=True, sorted=True)
    labels = bank_labels[idx]
    if not use_dist:
        return sims, labels
    # pad a short shard's candidates with -inf: they can never be among the global top k_max
    pad = k_max - k_local
    sims = F.pad(sims, (0, pad), value=float("-inf"))
    labels = F.pad(labels, (0, pad), value=0)
    sims, labels = all_gather_cat(sims, dim=1), all_gather_cat(labels, dim=1)
    sims, idx = sims.topk(k_max, dim=1, largest=True, sorted=True)
    return sims, labels.gather(1, idx)


def iter_knn_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    *,
    distributed: bool | None = None,
    test_labels: Tensor | None = None,
) -> Iterator[tuple[int, dict[int, Tensor]]]:
    """``(start, {k: class scores (chunk, C)})`` for consecutive chunks of the test set (see the module
    docstring). ``distributed`` None: shard the bank across ranks when a process group is running."""
    bank, bank_labels, effective, num_classes, use_dist = _setup(
        train_feats, train_labels, test_feats, test_labels, ks, temperature, num_classes, distributed
    )
    k_max = max(effective.values())
    for start in range(0, len(test_feats), chunk):
        query = F.normalize(test_feats[start : start + chunk].to(bank.device).float(), dim=1)
        sims, labels = _neighbours(query, bank, bank_labels, k_max, use_dist)
        weights = torch.softmax(sims / temperature, dim=1)
        scores = {}
        for k, k_eff in effective.items():
            votes = torch.zeros(len(query), num_classes, device=bank.device)
            scores[k] = votes.scatter_add_(1, labels[:, :k_eff], weights[:, :k_eff])
        yield start, scores


@torch.no_grad()
def knn_class_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    *,
    distributed: bool | None = None,
) -> dict[int, Tensor]:
    """``{k: (N_test, C) class scores}`` of the whole test set (fine for small sets; ``knn_classify``
    streams instead)."""
    parts: dict[int, list[Tensor]] = {}
    for _, scores in iter_knn_scores(
        train_feats, train_labels, test_feats, ks, temperature, num_classes, chunk, distributed=distributed
    ):
        for k, s in scores.items():
            parts.setdefault(k, []).append(s)
    return {k: torch.cat(p) for k, p in parts.items()}


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    *,
    distributed: bool | None = None,
) -> dict[int, dict[str, float | None]]:
    """``{k: {"top1": %, "top5": % or None}}`` of DINOv2's weighted kNN (see the module docstring).

    Features are L2-normalised here. ``num_classes`` None: the largest label seen + 1. When a process
    group runs (or ``distributed=True``), ``train_feats``/``train_labels`` are this rank's shard of the
    bank and ``test_feats``/``test_labels`` the whole test set, the same on every rank; every rank gets
    the same result. ``distributed=False`` treats the inputs as complete on each rank.
    """
    correct1: dict[int, int] = {}
    correct5: dict[int, int] = {}
    classes = 0
    for start, scores in iter_knn_scores(
        train_feats,
        train_labels,
        test_feats,
        ks,
        temperature,
        num_classes,
        chunk,
        distributed=distributed,
        test_labels=test_labels,
    ):
        for k, s in scores.items():
            classes = s.shape[1]
            target = test_labels[start : start + len(s)].to(s.device).long()
            top_scores, ranked = s.topk(min(5, classes), dim=1)
            correct1[k] = correct1.get(k, 0) + int((ranked[:, 0] == target).sum())
            # a class no neighbour voted for is never a hit (it would only fill the top 5 by topk's tie order)
            hit5 = (ranked == target[:, None]) & (top_scores > 0)
            correct5[k] = correct5.get(k, 0) + int(hit5.any(dim=1).sum())
    n = len(test_feats)
    return {
        k: {"top1": 100.0 * correct1[k] / n, "top5": 100.0 * correct5[k] / n if classes >= 5 else None}
        for k in correct1
    }


@torch.no_grad()
def evaluate_knn(
    backbone: nn.Module,
    train_loader,
    val_loader,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> dict:
    """DINOv2's kNN evaluation of ``backbone``'s final-norm CLS from two ``vitreg.eval.data`` loaders.

    The bank stays sharded across ranks (each rank extracts its own samples), the validation features are
    gathered to every rank. ``num_classes`` defaults to the train loader's dataset's ``num_classes`` if it
    has one, else the largest label + 1. Returns ``{"k=10": {"top1", "top5"}, ..., "best": {"k", "top1",
    "top5"}, "num_train", "num_val", "num_classes", "temperature", "skipped"}`` (percent).
    """
    ks = _checked_ks(ks)
    extract = {"device": device, "autocast_dtype": autocast_dtype}
    bank = _extract_probe_features(backbone, train_loader, gather=False, desc="kNN bank features", **extract)
    val = _extract_probe_features(backbone, val_loader, desc="kNN val features", **extract)
    if num_classes is None:
        num_classes = getattr(getattr(train_loader, "dataset", None), "num_classes", None)
    device = torch.device(device)
    train_feats = bank.cls[:, -1].to(device) if len(bank) else torch.empty(0, val.cls.shape[-1], device=device)
    results = knn_classify(
        train_feats,
        bank.labels.to(device),
        val.cls[:, -1].to(device),
        val.labels.to(device),
        ks,
        temperature,
        num_classes,
    )
    out: dict = {f"k={k}": r for k, r in results.items()}
    best_k = max(results, key=lambda k: results[k]["top1"])  # first of equals: ks order
    out["best"] = {"k": best_k, **results[best_k]}
    use_dist = is_distributed()
    out["num_train"] = _global_count(len(bank), device, use_dist)
    out["num_val"] = len(val)
    out["num_classes"] = num_classes
    out["temperature"] = temperature
    out["skipped"] = {"train": _global_skips(bank.skipped, device, use_dist), "val": val.skipped}
    return out


def _global_skips(skipped: dict[str, int], device: torch.device, use_dist: bool) -> dict[str, int]:
    reasons = sorted(skipped)
    if not use_dist or not reasons:
        return dict(skipped)
    counts = torch.tensor([skipped[r] for r in reasons], dtype=torch.long, device=device)
    all_reduce_many_([counts], "sum")
    return dict(zip(reasons, counts.tolist(), strict=True))


# ---------------------------------------------------------------- the pretraining callback's API
@torch.no_grad()
def extract_cls_features(
    backbone: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """L2-normalised final-norm CLS features (``x_norm_clstoken``) and labels of every ``(images, labels,
    ...)`` batch, on the CPU, in loader order, in this process only (no gathering)."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in batches:
            images, y = batch[0], batch[1]
            out = backbone.forward_features(images.to(device, non_blocking=True))
            feats.append(F.normalize(out["x_norm_clstoken"].float(), dim=-1).cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


extract_features = extract_cls_features  # the name vitreg.lit.callbacks imports


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
    """Top-1 accuracy (0–1) of DINOv2's weighted kNN with one ``k``, inputs complete in this process
    (never sharded: each rank computes the same thing)."""
    result = knn_classify(
        train_feats, train_labels, test_feats, test_labels, (k,), temperature, chunk=chunk, distributed=False
    )
    return result[k]["top1"] / 100.0


__all__ = [
    "DEFAULT_KS",
    "evaluate_knn",
    "extract_cls_features",
    "extract_features",
    "iter_knn_scores",
    "knn_accuracy",
    "knn_class_scores",
    "knn_classify",
]

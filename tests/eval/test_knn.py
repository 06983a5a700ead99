"""DINOv2's weighted kNN against hand computations and a per-query reference written from the formula.

The distributed path (sharded bank, two real processes) is tested in test_distributed.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitreg.data.transforms import eval_transform
from vitreg.eval.data import eval_loader
from vitreg.eval.knn import evaluate_knn, extract_cls_features, knn_accuracy, knn_class_scores, knn_classify
from vitreg.models.vision_transformer import build_vit


def reference_scores(train, train_labels, test, ks, t, num_classes):
    """Per query, straight from DINOv2's rule: top k_max by cosine, softmax(sims / T) over those k_max,
    class score = sum of the weights of the first k neighbours with that label."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    k_max = max(ks)
    out = {k: np.zeros((len(test), num_classes)) for k in ks}
    for q, query in enumerate(test):
        sims = train @ query
        order = np.argsort(-sims, kind="stable")[:k_max]
        weights = np.exp(sims[order] / t)
        weights /= weights.sum()
        for k in ks:
            for j in range(k):
                out[k][q, train_labels[order[j]]] += weights[j]
    return out


def clusters(n_classes, per_class, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    feats = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_hand_computed_vote_where_k1_and_k3_disagree():
    # query along the x axis; bank at angles 0.1 (class 0), 0.2 and 0.25 (class 1)
    angles = torch.tensor([0.1, 0.2, 0.25])
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    t = 0.07
    # by hand: weights = softmax(cos(angle) / T) over all 3 (k_max = 3), even for k = 1
    e = [math.exp(math.cos(a) / t) for a in (0.1, 0.2, 0.25)]
    w = [x / sum(e) for x in e]  # ~ (0.401, 0.324, 0.276)
    scores = knn_class_scores(bank, labels, query, ks=(1, 3), temperature=t)
    assert scores[1][0].tolist() == pytest.approx([w[0], 0.0], abs=1e-6)  # normalised over k_max, not k
    assert scores[3][0].tolist() == pytest.approx([w[0], w[1] + w[2]], abs=1e-6)
    result = knn_classify(bank, labels, query, torch.tensor([1]), ks=(1, 3), temperature=t)
    assert result[1]["top1"] == 0.0 and result[3]["top1"] == 100.0  # nearest says 0, the vote of 3 says 1
    assert result[1]["top5"] is None  # 2 classes: top-5 is not reported


def test_matches_reference_from_the_formula():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    train_labels, test_labels = torch.randint(0, 7, (60,), generator=g), torch.randint(0, 7, (25,), generator=g)
    ks, t = (1, 5, 20, 50), 0.1
    got = knn_class_scores(train, train_labels, test, ks, t, num_classes=7, chunk=7)
    want = reference_scores(train.numpy(), train_labels.numpy(), test.numpy(), ks, t, 7)
    for k in ks:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-4, atol=1e-6)
    result = knn_classify(train, train_labels, test, test_labels, ks, t, num_classes=7, chunk=7)
    for k in ks:
        ranked = np.argsort(-want[k], axis=1, kind="stable")
        top1 = 100 * np.mean(ranked[:, 0] == test_labels.numpy())
        voted = np.take_along_axis(want[k], ranked[:, :5], axis=1) > 0  # zero-vote classes are no hit
        top5 = 100 * np.mean(((ranked[:, :5] == test_labels.numpy()[:, None]) & voted).any(1))
        assert result[k]["top1"] == pytest.approx(top1)
        assert result[k]["top5"] == pytest.approx(top5)


def test_well_separated_clusters_are_perfectly_classified_for_every_k():
    train, train_labels = clusters(6, 50, 32, 0.05, seed=1)
    test, test_labels = clusters(6, 10, 32, 0.05, seed=1)  # same centres (same seed), fresh draws
    test = test + 0.01 * torch.randn_like(test)
    result = knn_classify(train, train_labels, test, test_labels)  # ks 10, 20, 100, 200 > 50 per class
    assert set(result) == {10, 20, 100, 200}
    for r in result.values():
        assert r == {"top1": 100.0, "top5": 100.0}


def test_a_bank_item_is_found_against_a_far_cluster():
    dim = 16
    far = F.normalize(-torch.eye(dim)[0] + 0.1 * torch.randn(40, dim), dim=1)  # around -e0, class 1
    item = torch.eye(dim)[:1]  # e0, class 3
    bank, labels = torch.cat([far, item]), torch.tensor([1] * 40 + [3])
    result = knn_classify(bank, labels, item, torch.tensor([3]), ks=(1, 10, 41))
    assert all(r["top1"] == 100.0 for r in result.values())


def test_random_labels_score_near_chance():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_labels, test_labels = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    result = knn_classify(train, train_labels, test, test_labels, ks=(10, 20, 100))
    for r in result.values():
        assert 5.0 < r["top1"] < 15.0  # chance 10 %, 1000 queries: sd ~1 %
        assert 42.0 < r["top5"] < 58.0  # chance 50 %


def test_features_are_compared_by_cosine_only():
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(80, 8, generator=g), torch.randn(30, 8, generator=g)
    train_labels, test_labels = torch.randint(0, 6, (80,), generator=g), torch.randint(0, 6, (30,), generator=g)
    base = knn_classify(train, train_labels, test, test_labels, ks=(1, 10))
    scaled = knn_classify(
        train * torch.rand(80, 1, generator=g).add(0.1) * 50, train_labels, test * 1e-3, test_labels, ks=(1, 10)
    )
    assert scaled == base


def test_top5_counts_only_classes_with_votes():
    g = torch.Generator().manual_seed(4)
    train, test = torch.randn(50, 4, generator=g), torch.randn(20, 4, generator=g)
    test_labels = torch.randint(0, 5, (20,), generator=g)
    # 5 classes, every one among the 50 neighbours: the target is always in the top 5
    result = knn_classify(train, torch.arange(50) % 5, test, test_labels, ks=(1, 50))
    assert result[50]["top5"] == 100.0 and result[50]["top1"] < 100.0
    # one neighbour votes for one class: top-5 is top-1, not filled up with unvoted classes
    assert result[1]["top5"] == result[1]["top1"] < 100.0


def test_k_beyond_the_bank_is_clamped_with_a_warning():
    g = torch.Generator().manual_seed(5)
    train, test = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    train_labels, test_labels = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (9,), generator=g)
    with pytest.warns(UserWarning, match="k=10 is larger than the 6"):
        clamped = knn_classify(train, train_labels, test, test_labels, ks=(10,))
    assert clamped[10] == knn_classify(train, train_labels, test, test_labels, ks=(6,))[6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ks": ()}, "positive integers"),
        ({"ks": (0,)}, "positive integers"),
        ({"temperature": 0.0}, "temperature"),
        ({"num_classes": 2}, "out of range"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    train, labels = torch.randn(10, 4), torch.arange(10) % 3
    with pytest.raises(ValueError, match=message):
        knn_classify(train, labels, train, labels, **kwargs)


def test_unlabelled_samples_are_refused():
    train = torch.randn(10, 4)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        knn_classify(train, torch.full((10,), -1), train, torch.zeros(10, dtype=torch.long))


# ---------------------------------------------------------------- the pretraining callback's API
def test_knn_accuracy_matches_the_formula_with_one_k():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    train_labels, test_labels = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    for k, t in [(1, 0.07), (5, 0.07), (20, 0.5)]:
        want = reference_scores(train.numpy(), train_labels.numpy(), test.numpy(), (k,), t, 4)[k]
        expected = float(np.mean(want.argmax(1) == test_labels.numpy()))
        assert knn_accuracy(train, train_labels, test, test_labels, k, t, chunk=7) == pytest.approx(expected)


def test_extract_cls_features_are_normalised_final_cls():
    torch.manual_seed(0)
    model = build_vit("vitt", depth=2, num_register_tokens=2, img_size=28, patch_size=14)
    model.train()
    images = torch.randn(5, 3, 28, 28)
    feats, labels = extract_cls_features(model, [(images[:3], torch.tensor([0, 1, 2])), (images[3:], [3, 4])])
    assert model.training  # mode restored
    model.eval()
    want = F.normalize(model.forward_features(images)["x_norm_clstoken"], dim=-1)
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- end to end
def test_evaluate_knn_on_synthetic_images():
    torch.manual_seed(0)
    model = build_vit("vitt", depth=2, num_register_tokens=2, img_size=28, patch_size=14)
    synthetic = {"num_images": 30, "image_size": 32, "num_classes": 5}

    def make(split):
        return eval_loader("synthetic", eval_transform(28), batch_size=8, split=split, synthetic=synthetic)

    out = evaluate_knn(model, make("train"), make("val"), ks=(1, 10))
    assert out["num_train"] == 30 and out["num_val"] == 30 and out["num_classes"] == 5
    assert set(out) >= {"k=1", "k=10", "best"}
    assert out["best"]["top1"] == max(out["k=1"]["top1"], out["k=10"]["top1"])
    # the same numbers as knn_classify on the final-norm CLS of the two splits
    feats = {}
    for split in ("train", "val"):
        images, labels = zip(*[(b[0], b[1]) for b in make(split)], strict=True)
        model.eval()
        with torch.no_grad():
            feats[split] = (model.forward_features(torch.cat(images))["x_norm_clstoken"], torch.cat(labels))
    direct = knn_classify(*feats["train"], *feats["val"], ks=(1, 10), num_classes=5)
    assert out["k=1"] == pytest.approx(direct[1]) and out["k=10"] == pytest.approx(direct[10])
    json.dumps(out)  # plain JSON

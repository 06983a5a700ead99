"""The evaluation collectives with two real CPU processes (torchrun, gloo) against one process.

Two ranks must give exactly what one process gives: ``gather_in_order`` rebuilds the source order (odd
sample counts, skipped samples), the rank-sharded kNN bank finds the same neighbours as the whole bank,
and feature extraction from rank-split loaders returns the same rows in the same order. With batch size
1 every image goes through the same computation in both runs, so the numbers are compared for equality.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.eval import dist_worker as worker
from vitreg.eval.distributed import gather_in_order
from vitreg.eval.features import extract_features
from vitreg.eval.knn import evaluate_knn, knn_accuracy, knn_class_scores, knn_classify
from vitreg.utils.distributed import all_reduce_many_, average_gradients_, gather_rows, rank_and_world

REPO = Path(__file__).resolve().parents[2]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "tests.eval.dist_worker",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return out


def load(out: Path, name: str) -> list[dict]:
    per_rank = [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for result in per_rank:
        assert "exception" not in result, result["exception"]
    return per_rank


def test_one_process_is_the_trivial_case():
    assert rank_and_world() == (0, 1)
    t = torch.randn(5, 2)
    assert gather_in_order(t) is t and gather_rows(t) is t
    assert torch.equal(gather_in_order(t[[3, 0, 4]], torch.tensor([3, 0, 4])), t[[0, 3, 4]])
    with pytest.raises(ValueError, match="more than one rank"):
        gather_in_order(t[:2], torch.tensor([1, 1]))
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    average_gradients_([p])
    all_reduce_many_([p.grad], "mean")
    assert p.grad.tolist() == [1.0, 1.0]


@pytest.mark.slow
def test_gather_in_order_rebuilds_the_source_order(results):
    full = worker.full_rows()
    for r in load(results, "gather"):
        assert torch.equal(r["strided"], full)
        assert r["labels"].tolist() == list(range(worker.N_ROWS)) and r["labels"].dtype == torch.long
        assert torch.equal(r["with_holes"], full[[0, 1, 2, 4, 5, 6]])  # sample 3 skipped
        assert torch.equal(r["uneven"], full[:3])  # rank 1 held nothing


@pytest.mark.slow
def test_gradients_and_means_are_averaged(results):
    for r in load(results, "reduce"):
        assert all(torch.equal(g, torch.full_like(g, 1.5)) for g in r["grads"])  # (1 + 2) / 2
        assert r["extra"].tolist() == [2.0] * 4  # (4 + 0) / 2
        assert r["mean"].tolist() == [0.5, 5.0]
        assert r["broadcast"].tolist() == [1.0, 1.0]


@pytest.mark.slow
def test_sharded_knn_equals_the_whole_bank(results):
    train, train_labels, test, test_labels = worker.knn_inputs()
    want = knn_classify(train, train_labels, test, test_labels, worker.KNN_KS, 0.07, num_classes=7, chunk=5)
    want_scores = knn_class_scores(train, train_labels, test, worker.KNN_KS, 0.07, num_classes=7)
    for r in load(results, "knn"):
        assert r["classify"] == want
        for k in worker.KNN_KS:
            torch.testing.assert_close(r["scores"][k], want_scores[k], rtol=1e-6, atol=1e-7)
        # knn_accuracy never shards: every rank holding the whole bank gets the one-process answer
        assert r["accuracy_full_bank"] == knn_accuracy(train, train_labels, test, test_labels, k=5)
    # not a vacuous comparison: the vote depends on k
    assert len({v["top1"] for v in want.values()}) > 1


@pytest.mark.slow
def test_extracted_features_do_not_depend_on_the_world_size(results):
    want = extract_features(worker.tiny_model(), worker.loader("val", worker.N_ROWS), n_blocks=2)
    per_rank = load(results, "features")
    for rank, r in enumerate(per_rank):
        exact, batched = r["exact"], r["batched"]
        # the workers compute on one thread, this process maybe on several: equal up to float reassociation
        torch.testing.assert_close(exact["cls"], want.cls, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exact["patch_mean"], want.patch_mean, rtol=1e-5, atol=1e-6)
        assert torch.equal(exact["labels"], want.labels) and exact["indices"].tolist() == list(range(worker.N_ROWS))
        assert batched["indices"].tolist() == list(range(worker.N_ROWS))
        torch.testing.assert_close(batched["cls"], want.cls, rtol=1e-5, atol=1e-5)
        assert r["local_indices"].tolist() == list(range(rank, worker.N_ROWS, WORLD))
        assert sum(exact["skipped"].values()) == 0


@pytest.mark.slow
def test_evaluate_knn_does_not_depend_on_the_world_size(results):
    model = worker.tiny_model()
    with pytest.warns(UserWarning, match="k=20 is larger than the 9 training samples"):  # clamped, also sharded
        want = evaluate_knn(model, worker.loader("train", 9), worker.loader("val", worker.N_ROWS), ks=(1, 3, 20))
    for r in load(results, "evaluate_knn"):
        assert r == want
    assert want["num_train"] == 9 and want["num_val"] == worker.N_ROWS

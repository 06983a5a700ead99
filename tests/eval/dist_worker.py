"""Worker for tests/eval/test_distributed.py: the evaluation collectives in real processes (torchrun, gloo).

Launched as ``python -m torch.distributed.run --nproc_per_node=2 -m tests.eval.dist_worker <out_dir>`` from
the repository root. Each scenario writes ``<out_dir>/<scenario>.rank<r>.pt`` (or ``{"exception": ...}``).
The inputs are built by the functions below, which the test also calls for its one-process references.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from vitreg.data.transforms import eval_transform
from vitreg.eval.data import eval_loader
from vitreg.eval.distributed import gather_in_order
from vitreg.eval.features import extract_features
from vitreg.eval.knn import evaluate_knn, knn_accuracy, knn_class_scores, knn_classify
from vitreg.models.vision_transformer import build_vit
from vitreg.utils.distributed import all_reduce_many_, average_gradients_, broadcast_, gather_rows, rank_and_world

N_ROWS = 7  # odd: the ranks hold 4 and 3 samples
KNN_KS = (1, 5, 20, 30)  # 30 > a rank's shard of the 41-sample bank: exercises the padding
SYNTHETIC = {"image_size": 32, "num_classes": 5}


def full_rows() -> torch.Tensor:
    return torch.arange(N_ROWS * 3, dtype=torch.float32).view(N_ROWS, 3)


def knn_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(41, 8, generator=g), torch.randn(23, 8, generator=g)
    return train, torch.randint(0, 7, (41,), generator=g), test, torch.randint(0, 7, (23,), generator=g)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # no LayerScale: with its 1e-5 init an untrained model gives almost the same CLS for every image (tied sims)
    return build_vit("vitt", depth=2, num_register_tokens=2, img_size=28, patch_size=14, layerscale_init=None)


def loader(split: str, num_images: int, batch_size: int = 1, num_workers: int = 0):
    synthetic = {**SYNTHETIC, "num_images": num_images}
    return eval_loader(
        "synthetic",
        eval_transform(28),
        batch_size=batch_size,
        num_workers=num_workers,
        split=split,
        synthetic=synthetic,
    )


def features_dict(f) -> dict:
    return {"cls": f.cls, "patch_mean": f.patch_mean, "labels": f.labels, "indices": f.indices, "skipped": f.skipped}


# ---------------------------------------------------------------- scenarios
def scenario_gather(rank: int, world: int) -> dict:
    full = full_rows()
    strided = gather_in_order(full[rank::world])
    labels = gather_in_order(torch.arange(N_ROWS)[rank::world])
    # with indices: sample 3 missing (skipped), local rows in reverse order
    mine = [i for i in range(rank, N_ROWS, world) if i != 3][::-1]
    with_holes = gather_in_order(full[mine], torch.tensor(mine))
    uneven = gather_rows(full[:3] if rank == 0 else torch.empty(0))
    return {"strided": strided, "labels": labels, "with_holes": with_holes, "uneven": uneven}


def scenario_reduce(rank: int, world: int) -> dict:
    layer = torch.nn.Linear(3, 2)
    extra = torch.nn.Parameter(torch.zeros(4))
    for p in layer.parameters():
        p.grad = torch.full_like(p, rank + 1.0)
    if rank == 0:
        extra.grad = torch.full_like(extra, 4.0)  # rank 1 has no gradient: takes part with zeros
    average_gradients_([*layer.parameters(), extra])
    value = torch.tensor([float(rank), 10.0 * rank])
    all_reduce_many_([value], "mean")
    start = torch.full((2,), float(rank))
    broadcast_([start], src=1)
    return {"grads": [p.grad for p in layer.parameters()], "extra": extra.grad, "mean": value, "broadcast": start}


def scenario_knn(rank: int, world: int) -> dict:
    train, train_labels, test, test_labels = knn_inputs()
    shard, shard_labels = train[rank::world], train_labels[rank::world]
    return {
        "classify": knn_classify(shard, shard_labels, test, test_labels, KNN_KS, 0.07, num_classes=7, chunk=5),
        "scores": knn_class_scores(shard, shard_labels, test, KNN_KS, 0.07, num_classes=7, chunk=5),
        "accuracy_full_bank": knn_accuracy(train, train_labels, test, test_labels, k=5),
    }


def scenario_features(rank: int, world: int) -> dict:
    model = tiny_model()
    exact = extract_features(model, loader("val", N_ROWS), n_blocks=2)
    batched = extract_features(model, loader("val", N_ROWS, batch_size=3, num_workers=2), n_blocks=2)
    local = extract_features(model, loader("val", N_ROWS), n_blocks=2, gather=False)
    return {"exact": features_dict(exact), "batched": features_dict(batched), "local_indices": local.indices}


def scenario_evaluate_knn(rank: int, world: int) -> dict:
    return evaluate_knn(tiny_model(), loader("train", 9), loader("val", N_ROWS), ks=(1, 3, 20))


SCENARIOS = {
    "gather": scenario_gather,
    "reduce": scenario_reduce,
    "knn": scenario_knn,
    "features": scenario_features,
    "evaluate_knn": scenario_evaluate_knn,
}


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    dist.init_process_group("gloo")
    rank, world = rank_and_world()
    torch.set_num_threads(1)
    failed = False
    for name, scenario in SCENARIOS.items():
        try:
            result = scenario(rank, world)
        except Exception:
            failed = True
            result = {"exception": traceback.format_exc()}
            print(f"[rank {rank}] scenario {name} failed:\n{result['exception']}", file=sys.stderr, flush=True)
        torch.save(result, out / f"{name}.rank{rank}.pt")
        if failed:
            break
    dist.barrier()  # no rank tears gloo down while its peer still talks to it
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))

"""DINOv2's linear probe: grid layout, optimiser and schedule, inputs, training and selection, each on a case
with a known answer; end to end on a tiny ViT with synthetic images in both feature modes."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.eval import linear_worker as worker
from tests.eval.linear_worker import SYNTHETIC, planted_features, tiny_vit
from vitreg.eval.features import Features
from vitreg.eval.linear import (
    DINOV2_LEARNING_RATES,
    AugmentedBatches,
    LinearClassifierGrid,
    LinearSettings,
    best_classifier,
    cached_batches,
    cached_iterations,
    classifier_name,
    evaluate_linear,
    grid_top1,
    probe_features,
    train_grid,
)


# ------------------------------------------------------------------------------------------ grid layout
def test_grid_names_dims_and_init_follow_dinov2():
    dim, classes = 48, 100
    grid = LinearClassifierGrid(dim, classes, batch_size=256, world_size=1)  # lr scale 1: names carry the base lr
    assert len(grid.specs) == len(grid.classifiers) == 2 * 2 * 13
    names = [s.name for s in grid.specs]
    assert names[0] == "classifier_1_blocks_avgpool_False_lr_0_00001"
    assert names[13] == "classifier_1_blocks_avgpool_True_lr_0_00001"
    assert "classifier_4_blocks_avgpool_True_lr_0_01000" in names
    assert names[-1] == "classifier_4_blocks_avgpool_True_lr_0_10000"
    assert list(grid.classifiers) == names
    for spec in grid.specs:
        assert spec.in_dim == spec.n_blocks * dim + (dim if spec.avgpool else 0)
        assert grid.classifiers[spec.name].weight.shape == (classes, spec.in_dim)
    assert [s.base_lr for s in grid.specs[:13]] == list(DINOV2_LEARNING_RATES)
    weights = torch.cat([c.weight.flatten() for c in grid.classifiers.values()])
    assert abs(weights.std().item() - 0.01) < 2e-4 and abs(weights.mean().item()) < 2e-4
    assert all(bool((c.bias == 0).all()) for c in grid.classifiers.values())
    # seeded init: identical on every rank (no broadcast needed), different for another seed
    again = LinearClassifierGrid(dim, classes, batch_size=256, world_size=1)
    other = LinearClassifierGrid(dim, classes, batch_size=256, world_size=1, seed=1)
    assert torch.equal(again.classifiers[names[5]].weight, grid.classifiers[names[5]].weight)
    assert not torch.equal(other.classifiers[names[5]].weight, grid.classifiers[names[5]].weight)


def test_names_carry_the_scaled_lr_with_enough_decimals():
    assert classifier_name(4, True, 0.01) == "classifier_4_blocks_avgpool_True_lr_0_01000"
    grid = LinearClassifierGrid(8, 3, batch_size=128, world_size=8)  # DINOv2's 8 GPUs: scale 4
    assert grid.specs[0].name == "classifier_1_blocks_avgpool_False_lr_0_00004"
    # batch 16: 1e-5 and 2e-5 scale to 6.25e-7 and 1.25e-6, equal at DINOv2's 5 decimals
    small = LinearClassifierGrid(8, 3, batch_size=16, world_size=1)
    assert len({s.name for s in small.specs}) == len(small.specs) == 52
    assert small.specs[0].name == "classifier_1_blocks_avgpool_False_lr_0_0000006"


def test_optimizer_lr_is_scaled_and_cosine_reaches_zero():
    batch, world, total = 32, 3, 10
    grid = LinearClassifierGrid(8, 4, n_last_blocks=(1, 2), batch_size=batch, world_size=world)
    optimizer, scheduler = grid.make_optimizer(total)
    assert len(optimizer.param_groups) == len(grid.specs) == 2 * 2 * 13
    for group, spec in zip(optimizer.param_groups, grid.specs, strict=True):
        assert group["lr"] == pytest.approx(spec.base_lr * batch * world / 256)
        assert group["momentum"] == 0.9 and group["weight_decay"] == 0
        assert {id(p) for p in group["params"]} == {id(p) for p in grid.classifiers[spec.name].parameters()}
    for step in range(1, total + 1):
        optimizer.step()
        scheduler.step()
        for group, spec in zip(optimizer.param_groups, grid.specs, strict=True):
            want = spec.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            assert group["lr"] == pytest.approx(want, abs=1e-15)
    assert max(g["lr"] for g in optimizer.param_groups) < 1e-15


# ------------------------------------------------------------------------------------------ inputs and loss
def test_classifiers_see_dinov2_linear_inputs():
    gen = torch.Generator().manual_seed(0)
    dim, classes = 6, 5
    grid = LinearClassifierGrid(dim, classes, n_last_blocks=(1, 3), learning_rates=(0.1,), world_size=1)
    cls, patch_mean = torch.randn(7, 3, dim, generator=gen), torch.randn(7, dim, generator=gen)
    logits = grid(cls, patch_mean)
    for spec in grid.specs:
        linear = grid.classifiers[spec.name]
        blocks = [cls[:, b] for b in range(3 - spec.n_blocks, 3)]  # last n blocks, oldest first
        x = torch.cat(blocks + ([patch_mean] if spec.avgpool else []), dim=1)
        torch.testing.assert_close(logits[spec.name], x @ linear.weight.T + linear.bias)
    # n_blocks=1 without avgpool sees exactly the last block's CLS
    name = "classifier_1_blocks_avgpool_False_lr_0_05000"
    with torch.no_grad():
        grid.classifiers[name].weight.copy_(torch.eye(classes, dim))
    torch.testing.assert_close(grid(cls, patch_mean)[name], cls[:, -1, :classes])


def test_loss_is_the_sum_of_cross_entropies_and_one_step_is_plain_sgd():
    gen = torch.Generator().manual_seed(1)
    grid = LinearClassifierGrid(4, 3, n_last_blocks=(1,), learning_rates=(0.1, 1.0), batch_size=64, world_size=2)
    before = {k: v.clone() for k, v in grid.state_dict().items()}
    cls, patch_mean, labels = (
        torch.randn(64, 1, 4, generator=gen),
        torch.randn(64, 4, generator=gen),
        torch.arange(64) % 3,
    )
    want = sum(F.cross_entropy(logits, labels) for logits in grid(cls, patch_mean).values())
    torch.testing.assert_close(grid.loss(cls, patch_mean, labels), want)
    # one step from zero momentum: w - lr·grad with lr = base·64·2/256 (the cosine applies from step 2 on)
    grads = {}
    for spec in grid.specs:
        linear = torch.nn.Linear(spec.in_dim, 3)
        linear.load_state_dict({k[len(f"classifiers.{spec.name}.") :]: v for k, v in before.items() if spec.name in k})
        x = torch.cat([cls[:, -1]] + ([patch_mean] if spec.avgpool else []), dim=1)
        F.cross_entropy(linear(x), labels).backward()
        grads[spec.name] = (linear.weight.detach() - spec.lr * linear.weight.grad, spec.lr)
    losses = train_grid(grid, iter([(cls, patch_mean, labels)]), 1)
    assert losses == [pytest.approx(want.item())]
    for spec in grid.specs:
        want_weight, lr = grads[spec.name]
        assert lr == pytest.approx(spec.base_lr / 2)
        torch.testing.assert_close(grid.classifiers[spec.name].weight, want_weight)


# ------------------------------------------------------------------------------------------ batches
def test_cached_batches_are_reshuffled_passes_split_over_ranks():
    n, batch = 10, 3
    feats = Features(cls=torch.arange(n).float().view(n, 1, 1), patch_mean=torch.zeros(n, 1), labels=torch.arange(n))
    one = cached_batches(feats, 2 * batch, seed=4)
    ranks = [cached_batches(feats, batch, seed=4, rank=r, world=2) for r in range(2)]
    seen = []
    for _ in range(5):  # 30 samples = 3 passes, batches running across pass boundaries
        whole = next(one)[2]
        parts = [next(r)[2] for r in ranks]
        assert torch.equal(torch.cat(parts), whole)
        torch.testing.assert_close(next(iter([parts[0]])).float(), whole[:batch].float())
        seen.append(whole)
    stream = torch.cat(seen)
    for p in range(3):  # every pass is a permutation of the train set, and passes differ
        assert sorted(stream[p * n : (p + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])
    assert cached_iterations(n, LinearSettings(epochs=3, batch_size=batch), world=2) == 3 * 2


# ------------------------------------------------------------------------------------------ training + selection
def test_planted_linear_map_is_learned():
    gen = torch.Generator().manual_seed(0)
    dim, classes = 16, 8
    weight = torch.randn(classes, dim, generator=gen)
    train = planted_features(4000, dim, weight, gen)
    val = planted_features(2000, dim, weight, gen)
    settings = LinearSettings(n_last_blocks=(1,), epochs=10, batch_size=64, mode="cached")
    probe = probe_features(train, val, settings, num_classes=classes)
    result = probe.result
    assert result["best"]["top1"] >= 97.0, result["best"]
    assert result["best"]["n_blocks"] == 1 and result["best"]["top1"] == max(result["classifiers"].values())
    assert result["num_train"] == 4000 and result["num_val"] == 2000 and result["num_classes"] == classes
    assert result["iterations"] == 10 * math.ceil(4000 / 64)
    # the best checkpoint reproduces its accuracy
    ckpt = probe.best_checkpoint()
    linear = torch.nn.Linear(ckpt["config"]["in_dim"], ckpt["config"]["num_classes"])
    linear.load_state_dict(ckpt["state_dict"])
    x = val.cls[:, -1] if not ckpt["config"]["avgpool"] else torch.cat([val.cls[:, -1], val.patch_mean], 1)
    top1 = 100.0 * (linear(x).argmax(1) == val.labels).float().mean().item()
    assert top1 == pytest.approx(result["best"]["top1"])


def test_labels_independent_of_features_give_chance():
    gen = torch.Generator().manual_seed(2)
    dim, classes = 16, 8

    def random_labels(n: int) -> Features:
        return Features(
            torch.randn(n, 1, dim, generator=gen), torch.randn(n, dim, generator=gen), torch.arange(n) % classes
        )

    settings = LinearSettings(n_last_blocks=(1,), epochs=3, batch_size=64, mode="cached")
    result = probe_features(random_labels(1000), random_labels(2000), settings).result
    # chance is 12.5 %; the best of 26 classifiers on 2000 val samples is a few std (0.74 %) above it
    assert 8.0 < result["best"]["top1"] < 17.0, result["best"]


def test_best_is_the_argmax_of_the_table_first_on_ties():
    grid = LinearClassifierGrid(3, 3, n_last_blocks=(1,), learning_rates=(0.1, 0.2), world_size=1)
    names = [s.name for s in grid.specs]
    table = dict(zip(names, [10.0, 55.0, 30.0, 55.0], strict=True))
    best = best_classifier(grid, table)
    assert best == {"name": names[1], "n_blocks": 1, "avgpool": False, "lr": 0.2, "scaled_lr": 0.1, "top1": 55.0}
    # grid_top1 on a constructed case: one classifier set to the identity is 100 % right, another always wrong
    feats = Features(
        cls=torch.eye(3).repeat(4, 1).view(12, 1, 3), patch_mean=torch.zeros(12, 3), labels=torch.arange(12) % 3
    )
    with torch.no_grad():
        grid.classifiers[names[2]].weight.copy_(torch.eye(3, 6))
        grid.classifiers[names[0]].weight.copy_(torch.eye(3).roll(1, 0))
    top1 = grid_top1(grid, feats, chunk=5)
    assert top1[names[2]] == 100.0 and top1[names[0]] == 0.0
    assert best_classifier(grid, top1)["name"] == names[2]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mode"):
        LinearSettings(mode="online")
    with pytest.raises(ValueError, match="n_last_blocks"):
        LinearSettings(n_last_blocks=(0, 4))
    with pytest.raises(ValueError, match="duplicates"):
        LinearSettings(learning_rates=(0.1, 0.1))
    feats = Features(torch.randn(4, 1, 3), torch.randn(4, 3), torch.arange(4) % 2)
    with pytest.raises(ValueError, match="last 4 blocks"):
        probe_features(feats, feats, LinearSettings(mode="cached"))


# ------------------------------------------------------------------------------------------ with a backbone
def test_augmented_batches_use_cls_and_register_free_patch_mean_and_run_across_passes():
    model = tiny_vit()
    with torch.no_grad():  # registers far from the patches: including them would move the patch mean a lot
        model.register_tokens.fill_(50.0)
    images = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    index = torch.arange(6)
    loader = [(images[:3], index[:3], index[:3]), (images[3:], index[3:], index[3:])]  # one pass = 6 images
    batches = AugmentedBatches(model, loader, batch_size=4, n_blocks=2)
    labels = [next(batches)[2].tolist() for _ in range(3)]
    assert labels == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]
    assert batches.seen == set(range(6))
    cls, patch_mean, _ = next(batches)
    with torch.no_grad():
        out = model.forward_features(images[:4])
    torch.testing.assert_close(cls[:, -1], out["x_norm_clstoken"])
    torch.testing.assert_close(patch_mean, out["x_norm_patchtokens"].mean(1))
    with_registers = torch.cat([out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1).mean(1)
    assert (patch_mean - with_registers).abs().max() > 0.1
    assert cls.shape == (4, 2, model.embed_dim)


@pytest.mark.parametrize("mode", ["cached", "augmented"])
def test_end_to_end_on_synthetic_images(mode, tmp_path):
    model = tiny_vit()
    settings = LinearSettings(
        n_last_blocks=(1, 2),
        learning_rates=(1e-3, 0.1),
        epochs=2,
        iterations_per_epoch=1,
        batch_size=8,
        mode=mode,
        resolution=28,
    )
    path = tmp_path / "linear_best.pt"
    result = evaluate_linear(
        model, "synthetic", "synthetic", settings, synthetic=SYNTHETIC, val_limit=12, best_checkpoint_path=path
    )
    json.dumps(result)
    assert set(result) >= {"best", "classifiers", "settings", "num_train", "num_val", "num_classes", "mode"}
    assert result["mode"] == mode and result["num_classes"] == 3 and result["num_val"] == 12
    assert len(result["classifiers"]) == 2 * 2 * 2
    assert result["best"]["top1"] == max(result["classifiers"].values())
    assert result["iterations"] == (2 * 1 if mode == "augmented" else 2 * math.ceil(24 / 8))
    assert result["num_train"] == (16 if mode == "augmented" else 24)  # augmented: 2 batches of 8 drawn
    assert not model.training
    ckpt = torch.load(path)
    assert ckpt["config"]["name"] == result["best"]["name"]
    in_dim = ckpt["config"]["n_blocks"] * 192 + (192 if ckpt["config"]["avgpool"] else 0)
    assert ckpt["state_dict"]["weight"].shape == (3, in_dim)


def test_backbone_shallower_than_n_last_blocks_is_refused():
    with pytest.raises(ValueError, match="last 4 blocks but the backbone has only 2"):
        evaluate_linear(tiny_vit(), "synthetic", "synthetic", LinearSettings(), synthetic=SYNTHETIC)


# ------------------------------------------------------------------------------------------ two processes
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_union_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={worker.WORLD}", "--nnodes=1"),
        *("--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "tests.eval.linear_worker", str(tmp_path)),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    records = {
        (name, rank): torch.load(tmp_path / f"{name}.rank{rank}.pt", weights_only=False)
        for name in ("cached", "augmented")
        for rank in range(worker.WORLD)
        if (tmp_path / f"{name}.rank{rank}.pt").exists()
    }
    errors = [r["exception"] for r in records.values() if "exception" in r]
    assert proc.returncode == 0 and not errors, "\n".join(errors) or proc.stderr[-6000:]

    # cached: the ranks' gradient average equals one process on the union batch (same lr: 16·2 = 32·1)
    train, val = worker.planted_split()
    reference = probe_features(train, val, worker.cached_settings(worker.WORLD * worker.PER_RANK))
    ranks = [records["cached", r] for r in range(worker.WORLD)]
    assert ranks[0]["result"]["world_size"] == worker.WORLD
    assert ranks[0]["result"]["iterations"] == reference.result["iterations"] == 3 * math.ceil(100 / 32)
    for key, want in reference.grid.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], want, rtol=1e-5, atol=1e-6)
    assert ranks[0]["result"]["final_loss"] == pytest.approx(reference.result["final_loss"], rel=1e-5)
    assert ranks[0]["result"]["classifiers"].keys() == reference.result["classifiers"].keys()
    for name, top1 in reference.result["classifiers"].items():  # 2 % = one of 50 val samples flipped by rounding
        assert abs(ranks[0]["result"]["classifiers"][name] - top1) <= 2.0 + 1e-9, name

    # augmented: each rank draws its own images, the averaged gradients keep the classifiers identical
    ranks = [records["augmented", r] for r in range(worker.WORLD)]
    assert ranks[0]["result"] == ranks[1]["result"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["result"]["num_train"] == 24  # 3 steps × 4 images × 2 ranks: every image once
    assert ranks[0]["result"]["num_val"] == SYNTHETIC["num_images"]

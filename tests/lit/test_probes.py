"""Online probes (vitreg/lit/probes.py) on constructed cases with known answers, and in real runs."""

from __future__ import annotations

import csv
import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from tests.conftest import TINY, compose_config
from vitreg.config import ConfigError, validate_config
from vitreg.lit.probes import (
    OnlineKNN,
    OnlineLinearProbe,
    ProbeSet,
    dataset_loader,
    teacher_cls_features,
    weighted_knn_top1,
)

NUM_CLASSES = 4
SIZE = 4  # probe image side


# ------------------------------------------------------------------------------------------ helpers
class CodeBackbone(nn.Module):
    """A backbone whose CLS is a perfect class code: the label written into pixel (0, 0, 0) of the
    image becomes a one-hot CLS. Records its mode and how many images it saw."""

    embed_dim = NUM_CLASSES

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[bool] = []
        self.images = 0

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.modes.append(self.training)
        self.images += len(x)
        labels = x[:, 0, 0, 0].round().long()
        return {"x_norm_clstoken": self.scale * F.one_hot(labels, NUM_CLASSES).float()}


def labelled_images(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    images[:, 0, 0, 0] = labels.float()
    return TensorDataset(images, labels)


class RecordingLogger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))


class StubModule:
    """What the probes use of a LightningModule: device, teacher.backbone and log_dict."""

    def __init__(self, backbone: nn.Module) -> None:
        self.device = torch.device("cpu")
        self.teacher = SimpleNamespace(backbone=backbone)
        self.logged: list[dict[str, float]] = []

    def log_dict(self, metrics: dict[str, float], **kwargs) -> None:
        self.logged.append(dict(metrics))


def stub_trainer(step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, loggers=[RecordingLogger()], is_global_zero=True)


def knn_probe(bank_images: int = 40, queries: int = 20, bank_size: int = 1000, every: int = 0, ks=(10, 20)):
    bank = ProbeSet("bank", dataset_loader(labelled_images(bank_images, 0), bank_size, 8, 0), SIZE)
    query = ProbeSet("queries", dataset_loader(labelled_images(queries, 1), 1000, 8, 0), SIZE)
    return OnlineKNN(bank, query, ks=ks, every_n_steps=every)


def drive(probe, trainer, module, steps: int) -> None:
    """Steps 0..steps-1 (batch start hooks), then the end of training at ``steps``."""
    for step in range(steps):
        trainer.global_step = step
        probe.on_train_batch_start(trainer, module, None, step)
    trainer.global_step = steps
    probe.on_train_end(trainer, module)


# ---------------------------------------------------------------------------------------------- kNN
def test_knn_of_a_perfect_class_code_is_100_percent_and_restores_the_mode():
    backbone = CodeBackbone().train()
    module, trainer = StubModule(backbone), stub_trainer()
    probe = knn_probe()
    metrics = probe.measure(trainer, module)
    assert metrics == {"top1_k10": 100.0, "top1_k20": 100.0}
    assert backbone.modes and not any(backbone.modes)  # measured in eval mode
    assert backbone.training  # ... and the mode is restored
    assert trainer.loggers[0].rows == [(0, {"val/knn_top1_k10": 100.0, "val/knn_top1_k20": 100.0})]


def test_knn_of_a_code_that_ignores_the_class_is_chance():
    """Every image gets the same CLS: all similarities tie, the vote is the bank's label histogram
    restricted to the first k neighbours, and exactly one class is predicted for every query."""

    class Constant(CodeBackbone):
        def forward_features(self, x):
            return {"x_norm_clstoken": torch.ones(len(x), NUM_CLASSES)}

    top1 = knn_probe(queries=20).measure(stub_trainer(), StubModule(Constant()))
    assert set(top1.values()) == {100.0 / NUM_CLASSES}  # 20 queries, 5 per class, one class always predicted


def test_weighted_knn_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    bank_labels, query_labels = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (30,), generator=g)
    got = weighted_knn_top1(bank, bank_labels, queries, query_labels, ks=[5, 20], temperature=0.07)
    sims = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    for k in (5, 20):
        correct = 0
        for q in range(30):  # DINOv2: softmax(sim / T) over the top max(ks), summed per class over the top k
            top, idx = sims[q].topk(20)
            weights = torch.softmax(top / 0.07, 0)[:k]
            votes = torch.zeros(3).index_add_(0, bank_labels[idx[:k]], weights)
            correct += int(votes.argmax() == query_labels[q])
        assert got[k] == pytest.approx(100 * correct / 30)


@pytest.mark.parametrize(("every", "steps", "expected"), [(0, 6, [0, 6]), (2, 6, [0, 2, 4, 6]), (2, 4, [0, 2, 4])])
def test_knn_cadence_and_results(every, steps, expected):
    backbone = CodeBackbone()
    module, trainer = StubModule(backbone), stub_trainer()
    probe = knn_probe(every=every)
    drive(probe, trainer, module, steps)
    assert [s for s, _ in probe.results["history"]] == expected
    assert [s for s, _ in trainer.loggers[0].rows] == expected  # no duplicate row when the end is a cadence step
    assert probe.results["before"] == probe.results["after"] == {"top1_k10": 100.0, "top1_k20": 100.0}
    assert backbone.images == len(expected) * (40 + 20)  # every measurement reads bank and queries once


def test_knn_bank_is_bounded_by_bank_size():
    backbone = CodeBackbone()
    probe = knn_probe(bank_images=100, bank_size=12, ks=[10])
    probe.measure(stub_trainer(), StubModule(backbone))
    feats, labels = probe.bank.features(stub_trainer(), StubModule(backbone))
    assert len(feats) == 12 and labels.tolist() == [i % NUM_CLASSES for i in range(12)]  # the first 12, in order
    assert backbone.images == 12 + 20


def test_features_come_back_in_sample_order():
    batches = [
        (torch.full((2, 3, 2, 2), float(i)), torch.tensor([i, i]), torch.tensor([2 * i + 1, 2 * i])) for i in (3, 0)
    ]

    class Echo(CodeBackbone):
        def forward_features(self, x):
            return {"x_norm_clstoken": x[:, 0, 0, :1]}

    feats, labels = teacher_cls_features(Echo(), batches, torch.device("cpu"), 2)
    assert labels.tolist() == [0, 0, 3, 3]  # sorted by sample index 0, 1, 6, 7
    assert feats[:, 0].tolist() == [0.0, 0.0, 3.0, 3.0]


def test_knn_state_survives_a_checkpoint():
    backbone = CodeBackbone()
    probe = knn_probe(every=2)
    drive(probe, stub_trainer(), StubModule(backbone), 4)
    buffer = io.BytesIO()
    torch.save(probe.state_dict(), buffer)
    buffer.seek(0)
    resumed = knn_probe(every=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # what Lightning's loader accepts
    assert resumed.results == probe.results
    trainer = stub_trainer(4)  # resumed at step 4: "before" is the checkpoint's, step 4 is not measured twice
    resumed.on_train_batch_start(trainer, StubModule(backbone), None, 0)
    assert trainer.loggers[0].rows == [] and resumed.results["before"] == probe.results["before"]


# ------------------------------------------------------------------------------------------- linear
def separable(n: int, seed: int, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose class is a linear function of them: class means far apart plus small noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return means[labels] + 0.5 * torch.randn(n, dim, generator=g), labels


def batch_of(labels: torch.Tensor) -> dict:
    return {"labels": labels}


def train(probe: OnlineLinearProbe, feats: torch.Tensor, labels: torch.Tensor, steps: int, start: int = 0):
    module = StubModule(nn.Identity())
    for step in range(start, start + steps):
        idx = torch.arange(step * 16, (step + 1) * 16) % len(feats)
        # global crops are crop-major: view 0 of the 8 images, then view 1 (here the same features)
        x = torch.cat([feats[idx[:8]], feats[idx[:8]]])
        probe.on_train_batch_end(
            stub_trainer(step), module, {"loss": 0.0, "teacher_cls": x}, batch_of(labels[idx[:8]]), 0
        )
    return module


def test_linear_probe_learns_a_linear_rule():
    feats, labels = separable(512, 0)
    val_feats, val_labels = separable(200, 1)
    probe = OnlineLinearProbe(NUM_CLASSES, lr=0.01)
    module = train(probe, feats, labels, 300)
    assert probe.top1(val_feats, val_labels) > 95.0
    assert set(module.logged[-1]) == {"train/linear_loss", "train/linear_top1"}
    assert (
        module.logged[-1]["train/linear_top1"] > 90.0
        and module.logged[-1]["train/linear_loss"] < module.logged[0]["train/linear_loss"]
    )


def test_linear_probe_never_touches_the_backbone():
    backbone = nn.Linear(16, 16)
    feats, labels = separable(64, 0)
    out = backbone(feats[:16])  # features still attached to the backbone's graph
    out.sum().backward()  # the module's own gradients, which the probe must leave alone
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in backbone.named_parameters()}
    probe = OnlineLinearProbe(NUM_CLASSES, lr=0.1)
    probe.on_train_batch_end(
        stub_trainer(), StubModule(backbone), {"loss": 0.0, "teacher_cls": out}, batch_of(labels[:8]), 0
    )
    for name, p in backbone.named_parameters():
        assert torch.equal(p, before[name][0]) and torch.equal(p.grad, before[name][1]), name
    assert probe.updates == 1 and all(p.grad is not None for p in probe.classifier.parameters())


def test_linear_probe_resumes_exactly_from_its_state():
    feats, labels = separable(256, 0)
    straight = OnlineLinearProbe(NUM_CLASSES, lr=0.01)
    train(straight, feats, labels, 30)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)  # momentum buffers included
    buffer.seek(0)
    resumed = OnlineLinearProbe(NUM_CLASSES, lr=0.01, seed=7)  # another init: the checkpoint must win
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(straight, feats, labels, 20, start=30)
    train(resumed, feats, labels, 20, start=30)
    for a, b in zip(straight.classifier.parameters(), resumed.classifier.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.updates == straight.updates == 50


def test_linear_probe_refuses_unlabelled_batches():
    probe = OnlineLinearProbe(NUM_CLASSES)
    outputs = {"loss": 0.0, "teacher_cls": torch.randn(4, 16)}
    with pytest.raises(ValueError, match=r"callbacks\.online_linear\.enabled.*labelled training shards \(cls\)"):
        probe.on_train_batch_end(stub_trainer(), StubModule(nn.Identity()), outputs, batch_of(torch.full((2,), -1)), 0)


def test_linear_probe_evaluates_on_its_val_set_on_cadence():
    feats, labels = separable(256, 0)
    val_images = labelled_images(20, 1)

    class Means(CodeBackbone):  # the val images' CLS: their class mean (so the trained rule applies)
        def forward_features(self, x):
            means = torch.randn(NUM_CLASSES, 16, generator=torch.Generator().manual_seed(123)) * 3
            return {"x_norm_clstoken": means[x[:, 0, 0, 0].round().long()]}

    val = ProbeSet("val", dataset_loader(val_images, 1000, 8, 0), SIZE)
    probe = OnlineLinearProbe(NUM_CLASSES, lr=0.01, every_n_steps=100, val=val)
    module = StubModule(Means())
    train(probe, feats, labels, 200)
    trainer = stub_trainer()
    for step in (0, 100, 150, 200):
        trainer.global_step = step
        probe.on_train_batch_start(trainer, module, None, 0)
    probe.on_train_end(trainer, module)  # step 200 again: no second measurement
    assert [s for s, _ in probe.results["history"]] == [100, 200]
    assert probe.results["after"] == 100.0
    assert [row for _, row in trainer.loggers[0].rows] == [{"val/linear_top1": 100.0}] * 2


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["callbacks.online_knn.ks=[0,20]"], "callbacks.online_knn.ks"),
        (["callbacks.online_knn.temperature=0"], "callbacks.online_knn.temperature"),
        (["callbacks.online_knn.bank_size=15"], "callbacks.online_knn.bank_size"),
        (["callbacks.online_knn.every_n_steps=-1"], "callbacks.online_knn.every_n_steps"),
        (["callbacks.online_linear.lr=0"], "callbacks.online_linear.lr"),
        (["callbacks.online_linear.every_n_steps=-1"], "callbacks.online_linear.every_n_steps"),
        (["data=webdataset", "data.webdataset.shards=x.tar"], "callbacks.online_knn.train_source"),
        (
            ["data=webdataset", "data.webdataset.shards=x.tar", "callbacks.online_knn.enabled=false"],
            "callbacks.online_linear.num_classes",
        ),
    ],
)
def test_probe_config_is_validated_by_key(overrides, key):
    on = ["callbacks.online_knn.enabled=true", "callbacks.online_linear.enabled=true"]
    cfg = compose_config([*TINY, *on, *overrides])
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate_config(cfg)


def test_probes_are_off_by_default():
    cfg = compose_config([])
    assert not cfg.callbacks.online_knn.enabled and not cfg.callbacks.online_linear.enabled
    demo = compose_config(["experiment=demo"])
    assert demo.callbacks.online_knn.enabled and demo.callbacks.online_knn.every_n_steps == 100


def test_probes_read_labelled_class_folders_through_the_eval_data(tmp_path):
    """With shards, the probe images come from the configured sources (here class folders), resized and
    centre-cropped to the global crop size, bounded by bank_size / num_queries; the linear probe shares
    the kNN's query set when its settings match."""
    from tests.conftest import write_class_folders
    from vitreg.lit.probes import build_online_probes

    train = write_class_folders(tmp_path / "train", 12, image_size=40, num_classes=3, seed=0)
    val = write_class_folders(tmp_path / "val", 9, image_size=40, num_classes=3, seed=1)
    cfg = compose_config(
        [
            *TINY,
            "data=webdataset",
            "data.webdataset.shards=x.tar",
            "callbacks.online_knn.enabled=true",
            f"callbacks.online_knn.train_source={train}",
            f"callbacks.online_knn.val_source={val}",
            "callbacks.online_knn.num_queries=4",
            "callbacks.online_knn.num_workers=0",
            "callbacks.online_linear.enabled=true",
            "callbacks.online_linear.num_classes=3",
            f"callbacks.online_linear.val_source={val}",
            "callbacks.online_linear.num_queries=4",
        ]
    )
    validate_config(cfg)
    knn, linear = build_online_probes(cfg, datamodule=None)
    assert linear is not None and knn is not None and linear.val is knn.queries and linear.num_classes == 3

    class Shapes(CodeBackbone):
        def forward_features(self, x):
            self.shapes = getattr(self, "shapes", set()) | {tuple(x.shape[1:])}
            return {"x_norm_clstoken": x.mean(dim=(2, 3))}

    backbone = Shapes()
    feats, labels = knn.bank.features(stub_trainer(), StubModule(backbone))
    per_class = [len(list(d.iterdir())) for d in sorted(train.iterdir())]
    assert feats.shape == (12, 3) and torch.bincount(labels, minlength=3).tolist() == per_class
    assert backbone.shapes == {(3, 28, 28)}  # augment.global_crops_size in TINY
    assert len(knn.queries.features(stub_trainer(), StubModule(backbone))[0]) == 4


# --------------------------------------------------------------------------------------- real runs
def run(cfg, steps: int) -> tuple[dict, dict]:
    """pretrain() for ``steps`` steps: (every step's train/* metrics, the summary)."""
    from omegaconf import open_dict

    from tests.lit.test_exact_resume import LossRecorder
    from vitreg.lit.pretrain import pretrain

    with open_dict(cfg):
        cfg.trainer.max_steps = steps
    recorder = LossRecorder()
    summary = pretrain(cfg, extra_callbacks=[recorder])
    return recorder.steps, summary


@pytest.mark.slow
def test_pretrain_with_both_probes_logs_them_and_resumes_them_exactly(tmp_path):
    """A tiny real run: metrics in the CSV, before/after in the summary; stopped at step 2 and resumed,
    the probes end exactly as in the uninterrupted run, and the run itself is the one without probes
    (measurements do not consume the training RNG, from which stochastic depth draws)."""
    base = [
        *TINY,
        "trainer.deterministic=true",
        "trainer.log_every_n_steps=1",
        "callbacks.checkpoint_every_n_steps=2",
        "callbacks.telemetry.enabled=false",
        "model.drop_path_rate=0.2",
    ]
    probes = [
        "callbacks.online_knn.enabled=true",
        "callbacks.online_knn.every_n_steps=2",
        "callbacks.online_linear.enabled=true",
        "callbacks.online_linear.every_n_steps=2",
    ]
    plain, _ = run(compose_config(base, run_dir=tmp_path / "plain"), 4)
    straight, summary = run(compose_config([*base, *probes], run_dir=tmp_path / "straight"), 4)
    resumed_cfg = compose_config([*base, *probes], run_dir=tmp_path / "resumed")
    first, _ = run(resumed_cfg, 2)
    second, resumed_summary = run(resumed_cfg, 4)
    resumed = {**first, **second}
    for step in plain:
        assert {k: straight[step][k] for k in plain[step]} == plain[step], f"step {step}"
        assert resumed[step] == straight[step], f"step {step}"

    knn = summary["knn"]
    assert [s for s, _ in knn["history"]] == [0, 2, 4]
    assert set(knn["before"]) == set(knn["after"]) == {"top1_k10", "top1_k20"}
    assert all(0.0 <= v <= 100.0 for v in [*knn["before"].values(), *knn["after"].values()])
    assert resumed_summary["knn"] == knn  # "before" came back from the checkpoint
    assert [s for s, _ in summary["linear"]["history"]] == [2, 4]
    assert resumed_summary["linear"] == summary["linear"]

    states = {}
    for name in ("straight", "resumed"):
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        states[name] = ckpt["callbacks"]
    linear = states["straight"]["OnlineLinearProbe"]
    assert linear["updates"] == 4
    for key, value in linear["classifier"].items():
        assert torch.equal(states["resumed"]["OnlineLinearProbe"]["classifier"][key], value)

    with open(tmp_path / "straight" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {
        "val/knn_top1_k10",
        "val/knn_top1_k20",
        "val/linear_top1",
        "train/linear_loss",
        "train/linear_top1",
    } <= logged
    assert [int(r["step"]) for r in rows if r.get("val/knn_top1_k20")] == [0, 2, 4]

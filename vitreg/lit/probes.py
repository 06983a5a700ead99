"""Online probes of the EMA teacher during pretraining: DINOv2's weighted kNN and a linear classifier.

- ``OnlineKNN``: DINOv2's kNN (cosine similarity, softmax-weighted votes of the k nearest bank images,
  T = 0.07) on the teacher's final-norm CLS, over a small labelled probe set: a bank (train split, at most
  ``bank_size`` images) and queries (val split). Measured at step 0 ("before"), every ``every_n_steps``
  and after training ("after"); logs ``val/knn_top1_k<k>`` (percent, as DINOv2 reports).
- ``OnlineLinearProbe`` (solo-learn's online classifier): an ``nn.Linear`` on the *detached* teacher CLS of
  the global crops of every training batch, with its own SGD; never part of the module's optimiser, so it
  cannot affect the backbone. Logs ``train/linear_loss``, ``train/linear_top1`` and ``val/linear_top1`` (%).

Both are off by default (label-free pretraining needs neither; solo-learn's lesson: keep the bank bounded
and the probe optional). The probe images are read again at every measurement (the teacher changes, so no
features are kept between steps); their loaders are built once.

Several processes: probe images are split across ranks (sample ``i`` on rank ``i % world``), every rank
runs the same number of teacher forwards (under FSDP2 a forward is a collective; a rank out of images
repeats a batch and discards the output), and the features are gathered in sample order, so every rank
computes the same numbers as one process would. Only rank 0 logs. Measurements run under
``torch.random.fork_rng``: they do not consume the training RNG, so enabling a probe does not change
the run it observes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vitreg.data.transforms import eval_transform
from vitreg.eval.data import eval_loader
from vitreg.eval.distributed import gather_in_order
from vitreg.eval.knn import knn_classify
from vitreg.utils.distributed import all_reduce_many_, rank_and_world

log = logging.getLogger(__name__)

# A loader factory: (rank, world) -> batches (images, labels, sample indices) of that rank's share.
LoaderFactory = Callable[[int, int], Iterable]
BackboneFn = Callable[[L.LightningModule], nn.Module]


def teacher_backbone(module: L.LightningModule) -> nn.Module:
    """The EMA teacher's backbone of a ``DINOv2Module``."""
    return module.teacher.backbone


def _rng_fork(device: torch.device) -> contextlib.AbstractContextManager:
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _forward_context(trainer: L.Trainer) -> contextlib.AbstractContextManager:
    """The training forward's precision (autocast under bf16-mixed); a no-op otherwise."""
    plugin = getattr(trainer, "precision_plugin", None)
    return plugin.forward_context() if plugin is not None else contextlib.nullcontext()


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        raise ValueError("probe loaders must yield (images, labels, sample indices) batches")
    images, labels, indices = batch
    return images, torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(indices, dtype=torch.long)


@torch.no_grad()
def teacher_cls_features(
    backbone: nn.Module,
    batches: Iterable,
    device: torch.device,
    image_size: int,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor, Tensor]:
    """Final-norm CLS (float32, not normalised) and labels of every image of every rank, in sample order,
    identical on every rank. Eval mode, restored afterwards.

    With several processes every rank runs as many forwards as the rank with the most batches: a rank
    out of batches forwards its last batch again (or a black image when it had none) and discards the
    output, since under FSDP2 each forward all-gathers the parameters with every rank."""
    _, world = rank_and_world()
    was_training = backbone.training
    backbone.eval()
    feats, labels, indices = [], [], []
    iterator = iter(batches)
    filler: Tensor | None = None
    try:
        while True:
            batch = next(iterator, None)
            if world > 1:
                more = torch.tensor([float(batch is not None)], device=device)
                all_reduce_many_([more], "max")
                if not more.item():
                    break
            elif batch is None:
                break
            if batch is None:
                images = filler if filler is not None else torch.zeros(1, 3, image_size, image_size)
            else:
                images, y, idx = _unpack(batch)
                filler = images[:1]
            with forward_context():
                cls = backbone.forward_features(images.to(device, non_blocking=True))["x_norm_clstoken"]
            if batch is not None:
                feats.append(cls.float())
                labels.append(y.to(device))
                indices.append(idx.to(device))
    finally:
        backbone.train(was_training)
    dim = getattr(backbone, "embed_dim", None)
    local_feats = torch.cat(feats) if feats else torch.empty(0, dim or 0, device=device)
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)
    local_indices = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=device)
    if world == 1:
        order = torch.argsort(local_indices)
        return local_feats[order], local_labels[order]
    return gather_in_order(local_feats, local_indices), gather_in_order(local_labels, local_indices)


class ProbeSet:
    """One labelled image set of the probes (the kNN bank, or the queries), read at every measurement.

    ``make_loader(rank, world)`` is called once, at the first measurement (when the process group
    exists), and must give that rank's share as (images, labels, sample indices) batches.
    ``features`` returns the teacher's CLS of the whole set on every rank, cached for the current
    ``global_step`` so the kNN and the linear probe measuring at the same step share one pass."""

    def __init__(self, name: str, make_loader: LoaderFactory, image_size: int) -> None:
        self.name = name
        self.make_loader = make_loader
        self.image_size = image_size
        self._loader: Iterable | None = None
        self._cache: tuple[tuple[int, int], Tensor, Tensor] | None = None

    def loader(self) -> Iterable:
        if self._loader is None:
            self._loader = self.make_loader(*rank_and_world())
        return self._loader

    def features(
        self, trainer: L.Trainer, module: L.LightningModule, backbone_fn: BackboneFn = teacher_backbone
    ) -> tuple[Tensor, Tensor]:
        backbone = backbone_fn(module)
        key = (int(trainer.global_step), id(backbone))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        device = module.device
        with _rng_fork(device):
            feats, labels = teacher_cls_features(
                backbone, self.loader(), device, self.image_size, lambda: _forward_context(trainer)
            )
        if len(feats) == 0:
            raise ValueError(f"the {self.name} probe set is empty: check its source and limit")
        self._cache = (key, feats, labels)
        return feats, labels


def _log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _due(step: int, every_n_steps: int, measured: Sequence[int], include_zero: bool) -> bool:
    if step in measured:
        return False
    if step == 0:
        return include_zero
    return every_n_steps > 0 and step % every_n_steps == 0


# ---------------------------------------------------------------------------------------------- kNN
def weighted_knn_top1(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int | None = None,
) -> dict[int, float]:
    """Top-1 (%) of DINOv2's weighted kNN (``vitreg.eval.knn.knn_classify``) for every k. The features
    are complete on every rank (gathered), so each rank computes the same numbers locally."""
    scores = knn_classify(
        bank,
        bank_labels,
        queries,
        query_labels,
        ks=tuple(ks),
        temperature=temperature,
        num_classes=num_classes,
        distributed=False,
    )
    return {k: float(scores[k]["top1"]) for k in ks}


class OnlineKNN(L.Callback):
    """DINOv2's weighted kNN on the teacher's CLS (see the module docstring).

    ``results``: ``{"before": {"top1_k10": %, ...} | None, "after": ... | None, "history": [(step, {...})]}``;
    it is part of the checkpoint, so a resumed run keeps its "before" and its history."""

    def __init__(
        self,
        bank: ProbeSet,
        queries: ProbeSet,
        *,
        ks: Sequence[int] = (10, 20),
        temperature: float = 0.07,
        every_n_steps: int = 0,
        num_classes: int | None = None,
        chance: float | None = None,
        backbone_fn: BackboneFn = teacher_backbone,
    ) -> None:
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {list(ks)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.bank = bank
        self.queries = queries
        self.ks = [int(k) for k in ks]
        self.temperature = temperature
        self.every_n_steps = every_n_steps
        self.num_classes = num_classes
        self.chance = chance
        self.backbone_fn = backbone_fn
        self.results: dict[str, Any] = {"before": None, "after": None, "history": []}

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        """Top-1 (%) for every k of the teacher now; recorded in ``results["history"]`` and logged."""
        step = int(trainer.global_step)
        bank, bank_labels = self.bank.features(trainer, module, self.backbone_fn)
        queries, query_labels = self.queries.features(trainer, module, self.backbone_fn)
        top1 = weighted_knn_top1(bank, bank_labels, queries, query_labels, self.ks, self.temperature, self.num_classes)
        metrics = {f"top1_k{k}": top1[k] for k in self.ks}
        self.results["history"].append((step, metrics))
        _log_metrics(trainer, {f"val/knn_{name}": v for name, v in metrics.items()}, step)
        chance = f" (chance {100 * self.chance:.1f}%)" if self.chance else ""
        shown = ", ".join(f"k={k}: {top1[k]:.1f}%" for k in self.ks)
        if trainer.is_global_zero:  # every rank computes the same numbers: one line per run
            log.info("kNN top-1 of the teacher at step %d: %s%s", step, shown, chance)
        return metrics

    def _measured_steps(self) -> list[int]:
        return [s for s, _ in self.results["history"]]

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if _due(step, self.every_n_steps, self._measured_steps(), include_zero=True):
            metrics = self.measure(trainer, module)
            if step == 0:
                self.results["before"] = metrics

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = int(trainer.global_step)
        history = self.results["history"]
        metrics = history[-1][1] if history and history[-1][0] == step else self.measure(trainer, module)
        if step == 0 and self.results["before"] is None:
            self.results["before"] = metrics
        self.results["after"] = metrics

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        results = state.get("results") or {}
        self.results = {
            "before": results.get("before"),
            "after": results.get("after"),
            "history": [(int(s), dict(m)) for s, m in results.get("history", [])],
        }


# ------------------------------------------------------------------------------------------- linear
class OnlineLinearProbe(L.Callback):
    """A linear classifier on the detached teacher CLS of each training batch's global crops (labels
    repeated per crop), stepped once per optimiser step, after the module's (``on_train_batch_end``).

    Own optimiser: SGD (``momentum``, ``lr``, ``weight_decay``), constant lr; weight ~ N(0, 0.01), bias 0
    as DINOv2's linear classifier, drawn from a generator seeded with ``seed`` (identical on every rank).
    Several processes: the summed gradients and counts are all-reduced and divided by the global number
    of labelled crops, so every rank keeps the same classifier and the update equals one process with the
    global batch. ``state_dict`` holds weights, optimiser state and results: resume is exact.

    Needs ``outputs["teacher_cls"]`` from the module's ``training_step`` (``DINOv2Module`` returns it).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        every_n_steps: int = 0,
        val: ProbeSet | None = None,
        seed: int = 0,
        backbone_fn: BackboneFn = teacher_backbone,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.num_classes = num_classes
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.every_n_steps = every_n_steps
        self.val = val
        self.seed = seed
        self.backbone_fn = backbone_fn
        self.classifier: nn.Linear | None = None
        self.optimizer: torch.optim.SGD | None = None
        self.updates = 0
        self.results: dict[str, Any] = {"after": None, "history": []}
        self._pending: dict[str, Any] | None = None

    # -- the classifier ---------------------------------------------------------------------------
    def build(self, dim: int, device: torch.device | str = "cpu") -> nn.Linear:
        """Create the classifier and its optimiser (once; a checkpoint's state is applied here)."""
        if self.classifier is None:
            # built on the meta device (nn.Linear's own init would draw from the training RNG), then
            # initialised from the probe's generator
            generator = torch.Generator().manual_seed(self.seed)
            classifier = nn.Linear(dim, self.num_classes, device="meta").to_empty(device=device)
            with torch.no_grad():
                classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) * 0.01)
                classifier.bias.zero_()
            self.classifier = classifier
            self.optimizer = torch.optim.SGD(
                self.classifier.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
            if self._pending is not None:
                self._apply(self._pending)
                self._pending = None
        return self.classifier

    def _apply(self, state: dict[str, Any]) -> None:
        assert self.classifier is not None and self.optimizer is not None
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])

    def train_step(self, feats: Tensor, labels: Tensor) -> dict[str, float]:
        """One SGD step on ``feats`` (N, D) with ``labels`` (N,); -1 labels are ignored. Returns the
        global mean loss and top-1 (%) of the batch (over all ranks)."""
        classifier = self.build(feats.shape[-1], feats.device)
        assert self.optimizer is not None
        feats = feats.detach().float()
        labelled = labels >= 0
        self.optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            logits = classifier(feats[labelled])
            loss_sum = F.cross_entropy(logits, labels[labelled], reduction="sum")
            loss_sum.backward()
        params = [classifier.weight, classifier.bias]
        stats = torch.stack(
            [loss_sum.detach(), (logits.argmax(-1) == labels[labelled]).sum().float(), labelled.sum().float()]
        )
        all_reduce_many_([*[p.grad for p in params], stats], "sum")  # one collective: gradients and counts
        count = stats[2].clamp_min(1)
        for p in params:
            p.grad /= count  # the gradient of the global mean loss
        self.optimizer.step()
        self.updates += 1
        return {"loss": float(stats[0] / count), "top1": float(100 * stats[1] / count)}

    @torch.no_grad()
    def top1(self, feats: Tensor, labels: Tensor) -> float:
        """Top-1 (%) of the classifier on ``feats`` (all of them on every rank)."""
        classifier = self.build(feats.shape[-1], feats.device)
        return float(100 * (classifier(feats.float()).argmax(-1) == labels).float().mean())

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not outputs:  # a skipped step (non-finite loss; Lightning passes {} or None): no update anywhere
            return
        if not isinstance(outputs, dict) or "teacher_cls" not in outputs:
            raise RuntimeError(
                "callbacks.online_linear needs training_step to return {'loss': ..., 'teacher_cls': ...} "
                "(DINOv2Module does)"
            )
        labels = batch["labels"].to(module.device)
        if bool((labels < 0).all()):
            raise ValueError(
                "callbacks.online_linear.enabled=true needs labelled training shards (cls), but this batch has "
                "no labels (all -1): write the shards with class labels (scripts/make_shards.py on class "
                "folders) or set callbacks.online_linear.enabled=false"
            )
        feats = outputs["teacher_cls"]
        views = len(feats) // len(labels)  # global crops are crop-major: every image's view 0, then view 1
        stats = self.train_step(feats, labels.repeat(views))
        module.log_dict(
            {"train/linear_loss": stats["loss"], "train/linear_top1": stats["top1"]},
            on_step=True,
            on_epoch=False,
            batch_size=len(labels),
        )

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> float | None:
        """``val/linear_top1`` (%) on the val probe set now (None without one)."""
        if self.val is None:
            return None
        step = int(trainer.global_step)
        feats, labels = self.val.features(trainer, module, self.backbone_fn)
        top1 = self.top1(feats, labels)
        self.results["history"].append((step, top1))
        _log_metrics(trainer, {"val/linear_top1": top1}, step)
        if trainer.is_global_zero:
            log.info("linear probe top-1 on the val probe set at step %d: %.1f%%", step, top1)
        return top1

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        measured = [s for s, _ in self.results["history"]]
        if _due(int(trainer.global_step), self.every_n_steps, measured, include_zero=False):
            self.evaluate(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        history = self.results["history"]
        step = int(trainer.global_step)
        self.results["after"] = history[-1][1] if history and history[-1][0] == step else self.evaluate(trainer, module)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"results": self.results, "updates": self.updates}
        if self.classifier is not None and self.optimizer is not None:
            state["classifier"] = {k: v.detach().cpu().clone() for k, v in self.classifier.state_dict().items()}
            state["optimizer"] = _to_cpu(self.optimizer.state_dict())
        elif self._pending is not None:
            state.update({k: self._pending[k] for k in ("classifier", "optimizer")})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        results = state.get("results") or {}
        self.results = {
            "after": results.get("after"),
            "history": [(int(s), float(v)) for s, v in results.get("history", [])],
        }
        self.updates = int(state.get("updates", 0))
        if "classifier" not in state:
            return
        if self.classifier is None:
            self._pending = {"classifier": state["classifier"], "optimizer": state["optimizer"]}
        else:
            self._apply(state)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


# -------------------------------------------------------------------------------------- probe images
class _IndexedSubset(Dataset):
    """Items ``indices`` of a labelled dataset as (image, label, index)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        image, label = self.dataset[self.indices[i]]
        return image, int(label), self.indices[i]


def dataset_loader(dataset: Dataset, limit: int, batch_size: int, num_workers: int) -> LoaderFactory:
    """A loader factory over the first ``limit`` items of a map-style labelled dataset, strided by rank."""

    def make(rank: int, world: int) -> DataLoader:
        n = min(len(dataset), limit)
        return DataLoader(
            _IndexedSubset(dataset, range(rank, n, world)), batch_size=batch_size, num_workers=num_workers
        )

    return make


def source_loader(
    source: str,
    split: str,
    resolution: int,
    limit: int,
    batch_size: int,
    num_workers: int,
    synthetic: dict | None = None,
    seed: int = 0,
) -> LoaderFactory:
    """A loader factory over a labelled source (class folders, list file, shards with cls, or "synthetic"
    with ``synthetic`` options) through ``vitreg.eval.data`` with DINOv2's eval transform at ``resolution``
    (resize to resolution·256/224, centre crop); split by rank there."""

    def make(rank: int, world: int) -> Iterable:
        return eval_loader(
            source,
            eval_transform(resolution),
            batch_size=batch_size,
            num_workers=num_workers,
            limit=limit,
            split=split,
            synthetic=synthetic if source == "synthetic" else None,
            seed=seed,
        )

    return make


# ------------------------------------------------------------------------------------------- wiring
def build_online_probes(cfg, datamodule: L.LightningDataModule) -> tuple[OnlineKNN | None, OnlineLinearProbe | None]:
    """The configured probes (``callbacks.online_knn``, ``callbacks.online_linear``; None when disabled).
    Sources that are null read the synthetic held-out images (``data.synthetic.knn_*_images``, at most
    ``bank_size`` / ``num_queries`` of them); ``validate_config`` has refused null sources with shards."""
    size = cfg.augment.global_crops_size
    synthetic = cfg.data.name == "synthetic"
    held_out: dict[str, Dataset] = {}

    def probe_set(name: str, source: str | None, split: str, limit: int, batch_size: int, workers: int) -> ProbeSet:
        own_images = synthetic and source in (None, "", "synthetic")  # the run's held-out synthetic images
        if not own_images:
            syn = cfg.data.synthetic
            options = {k: syn[k] for k in ("num_images", "image_size", "num_classes", "class_appearance")}
            options["num_images"] = syn.knn_train_images if split == "train" else syn.knn_val_images
            factory = source_loader(source, split, size, limit, batch_size, workers, options, cfg.seed)
            return ProbeSet(name, factory, size)
        if not held_out:
            bank, queries = datamodule.knn_loaders()
            held_out.update(train=bank.dataset, val=queries.dataset)
        return ProbeSet(name, dataset_loader(held_out[split], limit, batch_size, workers), size)

    knn_cfg, linear_cfg = cfg.callbacks.online_knn, cfg.callbacks.online_linear
    classes = cfg.data.synthetic.num_classes if synthetic else None
    knn = queries = None
    if knn_cfg.enabled:
        bank = probe_set(
            "kNN bank", knn_cfg.train_source, "train", knn_cfg.bank_size, knn_cfg.batch_size, knn_cfg.num_workers
        )
        queries = probe_set(
            "kNN query", knn_cfg.val_source, "val", knn_cfg.num_queries, knn_cfg.batch_size, knn_cfg.num_workers
        )
        sources_synthetic = {knn_cfg.train_source, knn_cfg.val_source} <= {None, "", "synthetic"}
        knn = OnlineKNN(
            bank,
            queries,
            ks=list(knn_cfg.ks),
            temperature=knn_cfg.temperature,
            every_n_steps=knn_cfg.every_n_steps,
            num_classes=cfg.data.synthetic.num_classes if sources_synthetic else None,
            chance=1 / cfg.data.synthetic.num_classes if sources_synthetic else None,
        )
    linear = None
    if linear_cfg.enabled:
        val = None
        same_as_knn = knn is not None and (linear_cfg.val_source, linear_cfg.num_queries) == (
            knn_cfg.val_source,
            knn_cfg.num_queries,
        )
        if same_as_knn:
            val = queries  # one pass of the teacher serves both probes when they measure at the same step
        elif linear_cfg.val_source or synthetic:  # else (unlabelled-by-default shards): train metrics only
            val = probe_set(
                "linear val",
                linear_cfg.val_source,
                "val",
                linear_cfg.num_queries,
                linear_cfg.batch_size,
                linear_cfg.num_workers,
            )
        linear = OnlineLinearProbe(
            linear_cfg.num_classes or classes,
            lr=linear_cfg.lr,
            momentum=linear_cfg.momentum,
            weight_decay=linear_cfg.weight_decay,
            every_n_steps=linear_cfg.every_n_steps,
            val=val,
            seed=cfg.seed,
        )
    return knn, linear

"""DINOv2's linear probe: a grid of linear classifiers on frozen features, all trained at once, best on val.

The protocol follows ``dinov2/eval/linear.py``:

- Inputs: the final-norm CLS token of the last ``n`` blocks (concatenated, oldest first), optionally followed
  by the mean of the last block's final-norm patch tokens (``avgpool``; registers are never part of it).
- Grid: ``n`` in ``n_last_blocks`` (default 1 and 4) × avgpool in (False, True) × 13 learning rates
  (1e-5 … 0.1). Each classifier is an ``nn.Linear`` with weight ~ N(0, 0.01) and zero bias, trained on the
  *same* batches; the loss is the sum of the classifiers' cross-entropies (their gradients do not interact).
- One SGD (momentum 0.9, no weight decay) with a parameter group per classifier at ``lr·batch·world/256``,
  cosine-annealed to 0 over all iterations (stepped after every optimiser step). Gradients are averaged
  over ranks (DDP's semantics, here with ``average_gradients_``), so ``world`` ranks with ``batch`` images each
  equal one process with ``batch·world``.
- Evaluation: top-1 (%) of every classifier on the val set; the best one is reported. As in DINOv2, the
  classifier is *selected on the val set it is reported on* (there is no separate selection split).
- Names are DINOv2's, with the *scaled* lr: ``classifier_4_blocks_avgpool_True_lr_0_01000``. When five
  decimals cannot tell two scaled lrs apart (small batches), more decimals are used for the whole grid.
- A backbone with fewer blocks than ``max(n_last_blocks)`` is refused with a ValueError (DINOv2 fails an
  assertion there); pass smaller ``n_last_blocks`` for shallow models.

Two feature modes:

- ``augmented`` (DINOv2's protocol): every iteration draws a fresh batch of train-transformed images
  (random resized crop + horizontal flip), runs the frozen backbone once (eval mode, no grad, optional
  autocast) for the last ``max(n_last_blocks)`` blocks and steps every classifier. ``epochs ×
  iterations_per_epoch`` iterations (DINOv2: 10 × 1250 at 128 images per GPU). The train images form an
  endless stream like DINOv2's infinite sampler: pass ``p`` over the (rank's share of the) source is shuffled
  and augmented with seeds derived from ``(seed, p)``, and batches run across pass boundaries.
- ``cached`` (our documented, much cheaper deviation): the features of the *eval-transformed* (resize +
  centre crop, no augmentation) train images are extracted once; the grid then trains for ``epochs`` passes
  of ``ceil(N / (batch·world))`` iterations over reshuffled mini-batches of these cached features. No
  augmentation means fewer distinct inputs, so accuracies are typically a little lower than DINOv2's (and
  the classifiers can overfit small train sets), at a tiny fraction of the backbone forwards.

In both modes the val features (eval transform) are extracted once, after training in ``augmented`` mode.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitreg.data.transforms import eval_transform, train_transform
from vitreg.eval.data import eval_loader
from vitreg.eval.features import Features, backbone_features, extract_features, linear_input
from vitreg.eval.progress import track
from vitreg.utils.distributed import all_reduce_many_, average_gradients_, rank_and_world

DINOV2_LEARNING_RATES: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DINOV2_N_LAST_BLOCKS: tuple[int, ...] = (1, 4)
MODES = ("augmented", "cached")
INIT_STD = 0.01  # DINOv2's LinearClassifier: weight ~ N(0, 0.01), bias 0
MOMENTUM = 0.9


@dataclass
class LinearProtocol:
    """The probe's protocol (defaults = DINOv2's), the ``linear`` section of conf/analyze.yaml. ``batch_size``
    is per rank; ``iterations_per_epoch`` is used by ``augmented`` only (``cached`` makes an epoch one pass
    over the cached train features)."""

    n_last_blocks: tuple[int, ...] = DINOV2_N_LAST_BLOCKS
    learning_rates: tuple[float, ...] = DINOV2_LEARNING_RATES
    epochs: int = 10
    iterations_per_epoch: int = 1250
    batch_size: int = 128
    mode: str = "augmented"  # one of MODES

    def __post_init__(self) -> None:
        self.n_last_blocks = tuple(int(n) for n in self.n_last_blocks)
        self.learning_rates = tuple(float(lr) for lr in self.learning_rates)
        if self.mode not in MODES:
            raise ValueError(f"linear probe mode {self.mode!r} is unknown; use one of {MODES}")
        if (
            not self.n_last_blocks
            or min(self.n_last_blocks) < 1
            or len(set(self.n_last_blocks)) != len(self.n_last_blocks)
        ):
            raise ValueError(f"n_last_blocks={self.n_last_blocks} must be distinct integers >= 1, e.g. (1, 4)")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError(f"learning_rates={self.learning_rates} must be a non-empty list of positive numbers")
        if len(set(self.learning_rates)) != len(self.learning_rates):
            raise ValueError(f"learning_rates={self.learning_rates} contains duplicates; list each lr once")
        for name in ("epochs", "iterations_per_epoch", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"linear probe {name}={getattr(self, name)} must be >= 1")


@dataclass
class LinearSettings(LinearProtocol):
    """The protocol plus what a run fixes besides it: the run's seed and the resolution of its images."""

    seed: int = 0
    resolution: int = 224

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.resolution) < 1:
            raise ValueError(f"linear probe resolution={self.resolution} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------ the grid
def scaled_lr(lr: float, batch_size: int, world_size: int) -> float:
    """DINOv2's ``scale_lr``: the lr for a global batch of ``batch_size·world_size`` images, relative to 256."""
    return lr * batch_size * world_size / 256.0


def classifier_name(n_blocks: int, avgpool: bool, lr: float, decimals: int = 5) -> str:
    """DINOv2's classifier name (``lr`` is the scaled lr): ``classifier_1_blocks_avgpool_False_lr_0_00050``."""
    return f"classifier_{n_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.{decimals}f}".replace(".", "_")


def _lr_decimals(lrs: list[float]) -> int:
    """Five decimals (DINOv2) unless that makes two distinct lrs print the same."""
    for decimals in range(5, 16):
        if len({f"{lr:.{decimals}f}" for lr in lrs}) == len(set(lrs)):
            return decimals
    return 16


@dataclass(frozen=True)
class ClassifierSpec:
    """One classifier of the grid: its inputs (``n_blocks``, ``avgpool``), base and scaled lr, input size."""

    name: str
    n_blocks: int
    avgpool: bool
    base_lr: float
    lr: float
    in_dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LinearClassifierGrid(nn.Module):
    """DINOv2's grid of linear classifiers over (n_blocks, avgpool, lr), in DINOv2's order.

    ``forward(cls, patch_mean)`` takes the CLS tokens of the last ``max_blocks`` blocks ``(B, n, D)`` (oldest
    first) and the last block's patch mean ``(B, D)`` and returns ``{name: logits}``. Initial weights come
    from a generator seeded by ``seed``, so every rank starts identical (DDP broadcasts rank 0's instead).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        n_last_blocks: Iterable[int] = DINOV2_N_LAST_BLOCKS,
        learning_rates: Iterable[float] = DINOV2_LEARNING_RATES,
        batch_size: int = 128,
        world_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a linear probe needs at least 2 classes, got num_classes={num_classes}")
        self.embed_dim, self.num_classes = int(embed_dim), int(num_classes)
        self.n_last_blocks = tuple(n_last_blocks)
        self.batch_size = int(batch_size)
        self.world_size = rank_and_world()[1] if world_size is None else int(world_size)
        base_lrs = list(learning_rates)
        decimals = _lr_decimals([scaled_lr(lr, batch_size, self.world_size) for lr in base_lrs])
        generator = torch.Generator().manual_seed(seed)
        self.specs: list[ClassifierSpec] = []
        self.classifiers = nn.ModuleDict()
        for n in self.n_last_blocks:
            for avgpool in (False, True):
                in_dim = n * self.embed_dim + (self.embed_dim if avgpool else 0)
                for base_lr in base_lrs:
                    lr = scaled_lr(base_lr, batch_size, self.world_size)
                    spec = ClassifierSpec(classifier_name(n, avgpool, lr, decimals), n, avgpool, base_lr, lr, in_dim)
                    linear = nn.Linear(in_dim, self.num_classes)
                    with torch.no_grad():
                        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * INIT_STD)
                        linear.bias.zero_()
                    self.specs.append(spec)
                    self.classifiers[spec.name] = linear

    @property
    def max_blocks(self) -> int:
        return max(self.n_last_blocks)

    def spec(self, name: str) -> ClassifierSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise KeyError(f"no classifier named {name!r} in the grid")

    def forward(self, cls: Tensor, patch_mean: Tensor) -> dict[str, Tensor]:
        # One input per (n_blocks, avgpool), shared by that row's 13 learning rates.
        inputs = {
            (n, avgpool): linear_input(cls, patch_mean, n, avgpool)
            for n in self.n_last_blocks
            for avgpool in (False, True)
        }
        return {s.name: self.classifiers[s.name](inputs[s.n_blocks, s.avgpool]) for s in self.specs}

    def loss(self, cls: Tensor, patch_mean: Tensor, labels: Tensor) -> Tensor:
        """DINOv2's training loss: the sum over classifiers of their mean cross-entropy."""
        return sum(F.cross_entropy(logits, labels) for logits in self(cls, patch_mean).values())

    def make_optimizer(self, total_iterations: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LRScheduler]:
        """SGD (momentum 0.9, wd 0) with a group per classifier at its scaled lr, cosine-annealed to 0."""
        groups = [{"params": list(self.classifiers[s.name].parameters()), "lr": s.lr} for s in self.specs]
        optimizer = torch.optim.SGD(groups, momentum=MOMENTUM, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_iterations, eta_min=0.0)
        return optimizer, scheduler

    def checkpoint(self, name: str) -> dict[str, Any]:
        """What ``linear_best.pt`` holds: the classifier's config and its ``nn.Linear`` state dict (CPU)."""
        linear = self.classifiers[name]
        return {
            "config": {**self.spec(name).to_dict(), "embed_dim": self.embed_dim, "num_classes": self.num_classes},
            "state_dict": {k: v.detach().cpu().clone() for k, v in linear.state_dict().items()},
        }


# ------------------------------------------------------------------------------------------ training
def train_grid(
    grid: LinearClassifierGrid,
    batches: Iterator[tuple[Tensor, Tensor, Tensor]],
    iterations: int,
    *,
    device: torch.device | str = "cpu",
) -> list[float]:
    """``iterations`` SGD steps of every classifier on ``(cls, patch_mean, labels)`` batches; returns the
    summed loss of every iteration (averaged over ranks: the loss of the global batch). Gradients are
    averaged over ranks before each step."""
    if iterations < 1:
        raise ValueError(f"the linear probe needs at least one iteration, got {iterations}")
    grid.to(device).train()
    optimizer, scheduler = grid.make_optimizer(iterations)
    params = list(grid.parameters())
    losses = []
    for _ in track(range(iterations), "linear grid training", unit="iterations"):
        cls, patch_mean, labels = (t.to(device, non_blocking=True) for t in next(batches))
        loss = grid.loss(cls.float(), patch_mean.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients_(params)
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
    stacked = torch.stack(losses)
    all_reduce_many_([stacked], "mean")  # one collective at the end, not one per step
    return stacked.cpu().tolist()


def cached_batches(
    features: Features, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Endless mini-batches of cached features, like DINOv2's infinite sampler: successive permutations
    (one generator seeded by ``seed``) are concatenated and cut into global batches of ``batch_size·world``,
    of which rank ``r`` takes rows ``[r·batch_size, (r+1)·batch_size)``. Every rank holds all features and
    draws the same permutations, so the union over ranks is the one-process batch."""
    n = len(features.labels)
    if n == 0:
        raise ValueError("the linear probe got no training features")
    generator = torch.Generator().manual_seed(seed)
    global_batch = batch_size * world
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < global_batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        mine = order[rank * batch_size : (rank + 1) * batch_size]
        order = order[global_batch:]
        yield features.cls[mine], features.patch_mean[mine], features.labels[mine]


def cached_iterations(num_train: int, settings: LinearSettings, world: int) -> int:
    """``epochs`` passes over ``num_train`` cached features in global batches of ``batch_size·world``."""
    return settings.epochs * math.ceil(num_train / (settings.batch_size * world))


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def grid_top1(
    grid: LinearClassifierGrid, features: Features, *, device: torch.device | str = "cpu", chunk: int = 4096
) -> dict[str, float]:
    """Top-1 accuracy (%) of every classifier of the grid on ``features``."""
    n = len(features.labels)
    if n == 0:
        raise ValueError("the linear probe got no validation features")
    grid.to(device).eval()
    correct = {s.name: 0 for s in grid.specs}
    for start in range(0, n, chunk):
        cls, patch_mean, labels = (
            t[start : start + chunk].to(device) for t in (features.cls, features.patch_mean, features.labels)
        )
        for name, logits in grid(cls.float(), patch_mean.float()).items():
            correct[name] += int((logits.argmax(dim=1) == labels).sum())
    return {name: 100.0 * c / n for name, c in correct.items()}


def best_classifier(grid: LinearClassifierGrid, table: dict[str, float]) -> dict[str, Any]:
    """The classifier with the highest top-1 (the first in grid order on ties, as DINOv2's strict ``>``)."""
    name = max(table, key=table.__getitem__)
    spec = grid.spec(name)
    return {
        "name": name,
        "n_blocks": spec.n_blocks,
        "avgpool": spec.avgpool,
        "lr": spec.base_lr,
        "scaled_lr": spec.lr,
        "top1": table[name],
    }


# ------------------------------------------------------------------------------------------ entry points
@dataclass
class LinearProbe:
    """A finished probe: the JSON-serialisable ``result`` and the trained ``grid``."""

    result: dict[str, Any]
    grid: LinearClassifierGrid = field(repr=False)

    def best_checkpoint(self) -> dict[str, Any]:
        """Config + ``nn.Linear`` state dict of the best classifier (for ``linear_best.pt``)."""
        return self.grid.checkpoint(self.result["best"]["name"])


def _check_blocks(available: int, settings: LinearSettings, what: str) -> None:
    wanted = max(settings.n_last_blocks)
    if wanted > available:
        raise ValueError(
            f"n_last_blocks={settings.n_last_blocks} asks for the last {wanted} blocks but {what} has only "
            f"{available}; use n_last_blocks values <= {available}"
        )


def _num_classes(explicit: int | None, *labels: Tensor) -> int:
    if explicit is not None:
        return int(explicit)
    return int(max(int(t.max()) for t in labels if len(t))) + 1


def _result(
    grid: LinearClassifierGrid,
    table: dict[str, float],
    settings: LinearSettings,
    *,
    num_train: int,
    num_val: int,
    iterations: int,
    losses: list[float],
) -> dict[str, Any]:
    return {
        "best": best_classifier(grid, table),
        "classifiers": table,
        "settings": settings.to_dict(),
        "mode": settings.mode,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_classes": grid.num_classes,
        "world_size": grid.world_size,
        "iterations": int(iterations),
        "final_loss": float(losses[-1]),
    }


def probe_features(
    train: Features,
    val: Features,
    settings: LinearSettings | None = None,
    *,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
) -> LinearProbe:
    """The ``cached`` probe on features already extracted (every rank holding all of them, as
    ``extract_features`` returns them): train the grid, then rank it on ``val``."""
    settings = settings or LinearSettings(mode="cached")
    if len(train.labels) == 0 or len(val.labels) == 0:
        raise ValueError(
            f"the linear probe needs train and val features, got {len(train.labels)} and {len(val.labels)}"
        )
    _check_blocks(train.cls.shape[1], settings, "the train features")
    _check_blocks(val.cls.shape[1], settings, "the val features")
    rank, world = rank_and_world()
    grid = LinearClassifierGrid(
        train.cls.shape[-1],
        _num_classes(num_classes, train.labels, val.labels),
        n_last_blocks=settings.n_last_blocks,
        learning_rates=settings.learning_rates,
        batch_size=settings.batch_size,
        world_size=world,
        seed=settings.seed,
    )
    iterations = cached_iterations(len(train.labels), settings, world)
    batches = cached_batches(train, settings.batch_size, seed=settings.seed, rank=rank, world=world)
    losses = train_grid(grid, batches, iterations, device=device)
    table = grid_top1(grid, val, device=device)
    result = _result(
        grid,
        table,
        settings,
        num_train=len(train.labels),
        num_val=len(val.labels),
        iterations=iterations,
        losses=losses,
    )
    return LinearProbe(result, grid)


def _autocast(device: torch.device | str, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class AugmentedBatches:
    """Endless ``(cls, patch_mean, labels)`` batches of ``batch_size`` freshly augmented train images through
    the frozen backbone (DINOv2's training input). Pass ``p`` over this rank's share of the source is
    shuffled and augmented from ``(seed, p)`` (``LabelledImages.set_epoch``); batches run across passes, as
    with DINOv2's infinite sampler, so every rank makes the same number of steps whatever its share.
    ``seen`` collects the indices of the images drawn so far."""

    def __init__(
        self,
        backbone: nn.Module,
        loader: Iterable,
        batch_size: int,
        n_blocks: int,
        *,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.backbone, self.loader, self.batch_size, self.n_blocks = backbone, loader, batch_size, n_blocks
        self.device, self.autocast_dtype = device, autocast_dtype
        self.seen: set[int] = set()
        self._images = self._image_batches()

    def _image_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels, held = [], [], 0
        for epoch in itertools.count():
            dataset = getattr(self.loader, "dataset", None)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            drawn = 0
            for batch_images, batch_labels, batch_indices in self.loader:
                drawn += len(batch_images)
                self.seen.update(batch_indices.tolist())
                images.append(batch_images)
                labels.append(batch_labels)
                held += len(batch_images)
                while held >= self.batch_size:
                    all_images, all_labels = torch.cat(images), torch.cat(labels)
                    yield all_images[: self.batch_size], all_labels[: self.batch_size]
                    images, labels = [all_images[self.batch_size :]], [all_labels[self.batch_size :]]
                    held -= self.batch_size
            if drawn == 0:
                raise ValueError(
                    "the linear probe's train source gave this rank no readable image; check train_source "
                    "(and that it has at least as many images as ranks)"
                )

    def __iter__(self) -> AugmentedBatches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        images, labels = next(self._images)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with _autocast(self.device, self.autocast_dtype):
                cls, patch_mean = backbone_features(self.backbone, images.to(self.device), self.n_blocks)
        finally:
            self.backbone.train(was_training)
        return cls, patch_mean, labels


def _check_labels(labels: Tensor, num_classes: int, what: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what} labels span [{int(labels.min())}, {int(labels.max())}] but num_classes={num_classes}; "
            "pass the right num_classes"
        )


def run_linear_probe(
    backbone: nn.Module,
    train_source: str | os.PathLike,
    val_source: str | os.PathLike,
    settings: LinearSettings | None = None,
    *,
    synthetic: dict | None = None,
    train_limit: int | None = None,
    val_limit: int | None = None,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> LinearProbe:
    """DINOv2's linear probe of a frozen ``backbone`` (already on ``device``) from labelled image sources
    (``vitreg.eval.data``: class folders, list file, labelled shards or ``"synthetic"``, with ``synthetic``
    options; the synthetic train and val sources use their ``train`` and ``val`` splits).

    ``settings.mode`` picks ``augmented`` (DINOv2's) or ``cached`` (see the module docstring). Every rank
    reads its share of the images; the result is the same on every rank. ``num_classes`` defaults to the
    train source's. ``result["num_train"]`` is the number of distinct train images the probe used (in
    ``augmented`` mode: drawn, all of them once a pass completes).
    """
    settings = settings or LinearSettings()
    depth = getattr(backbone, "n_blocks", None)  # DINOv2's interface; a foreign backbone is checked when run
    if depth is not None:
        _check_blocks(depth, settings, "the backbone")
    n_blocks = max(settings.n_last_blocks)
    # ``seed`` also picks the synthetic images (its train and val splits stay disjoint for any seed)
    common = {
        "batch_size": settings.batch_size,
        "num_workers": num_workers,
        "synthetic": synthetic,
        "seed": settings.seed,
    }
    extract = {"n_blocks": n_blocks, "device": device, "autocast_dtype": autocast_dtype}
    eval_tf = eval_transform(settings.resolution)

    if settings.mode == "cached":
        train_loader = eval_loader(train_source, eval_tf, limit=train_limit, split="train", **common)
        num_classes = train_loader.dataset.num_classes if num_classes is None else num_classes
        train = extract_features(backbone, train_loader, desc="linear train features", **extract)
        _check_labels(train.labels, num_classes, "train")
        val_loader = eval_loader(val_source, eval_tf, limit=val_limit, split="val", **common)
        val = extract_features(backbone, val_loader, desc="linear val features", **extract)
        _check_labels(val.labels, num_classes, "val")
        return probe_features(train, val, settings, num_classes=num_classes, device=device)

    train_loader = eval_loader(
        train_source, train_transform(settings.resolution), limit=train_limit, split="train", shuffle=True, **common
    )
    num_classes = train_loader.dataset.num_classes if num_classes is None else num_classes
    _, world = rank_and_world()
    batches = AugmentedBatches(
        backbone, train_loader, settings.batch_size, n_blocks, device=device, autocast_dtype=autocast_dtype
    )
    first = next(batches)
    _check_labels(first[2], num_classes, "train")
    grid = LinearClassifierGrid(
        first[0].shape[-1],
        num_classes,
        n_last_blocks=settings.n_last_blocks,
        learning_rates=settings.learning_rates,
        batch_size=settings.batch_size,
        world_size=world,
        seed=settings.seed,
    )
    iterations = settings.epochs * settings.iterations_per_epoch
    losses = train_grid(grid, _chain_first(first, batches), iterations, device=device)
    val_loader = eval_loader(val_source, eval_tf, limit=val_limit, split="val", **common)
    val = extract_features(backbone, val_loader, desc="linear val features", **extract)
    _check_labels(val.labels, num_classes, "val")
    table = grid_top1(grid, val, device=device)
    num_train = torch.tensor([len(batches.seen)], dtype=torch.long)
    all_reduce_many_([num_train], "sum")  # ranks draw disjoint samples
    result = _result(
        grid, table, settings, num_train=int(num_train), num_val=len(val.labels), iterations=iterations, losses=losses
    )
    return LinearProbe(result, grid)


def _chain_first(first: tuple[Tensor, Tensor, Tensor], rest: Iterator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    yield first
    yield from rest


def evaluate_linear(
    backbone: nn.Module,
    train_source: str | os.PathLike,
    val_source: str | os.PathLike,
    settings: LinearSettings | None = None,
    *,
    best_checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``run_linear_probe(...).result`` (JSON-serialisable); with ``best_checkpoint_path`` rank 0 also saves
    the best classifier (``{"config", "state_dict"}``, e.g. ``linear_best.pt``)."""
    probe = run_linear_probe(backbone, train_source, val_source, settings, **kwargs)
    if best_checkpoint_path is not None and rank_and_world()[0] == 0:
        path = Path(best_checkpoint_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(probe.best_checkpoint(), path)
    return probe.result

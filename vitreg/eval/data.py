"""Labelled images for evaluation: a rank-split labelled dataset and its loader.

Sources (``LabelledImages``; detected by ``vitreg.data.sources.image_source``), each read in one
deterministic order in which sample ``i`` has index ``i``:

* a class-folder tree ``root/<class>/<image>`` (labels: the sorted class folder names, ``find_images``);
* a list file, one ``path<TAB>label`` per line (relative paths from the file's folder);
* WebDataset shards with a ``cls`` label per sample: a ``.tar``, a folder of ``.tar`` files or a brace
  pattern ``shards/val-{000000..000003}.tar`` (shards in order, samples in tar order);
* ``"synthetic"``: ``SyntheticShapes``, whose ``train`` and ``val`` splits are disjoint random streams.

The transforms (DINOv2's ``eval_transform`` and ``train_transform``) live in ``vitreg.data.transforms``.

Sample ``i`` is read by rank ``i % world`` only, so the ranks together see each sample exactly once (no
padding, unlike ``DistributedSampler``); inside a rank the DataLoader workers split the rank's samples
again. ``vitreg.eval.distributed.gather_in_order`` puts the rows back in source order. Undecodable images
are skipped and counted (``LabelledImages.skipped``), never fatal; an unlabelled sample is an error, since
evaluation needs labels. Local shards are walked header by header, so a process reads the bytes of its
own samples only.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitreg.data.decode import IMAGE_EXTENSIONS, REASONS, DecodeError, decode_image
from vitreg.data.shards import local_shard_path, missing_shards
from vitreg.data.sources import SOURCE_HELP, SYNTHETIC, image_source
from vitreg.data.synthetic import SyntheticShapes
from vitreg.data.tar import SkipCounter, shard_samples
from vitreg.data.transforms import accepts_generator
from vitreg.data.webdataset import buffer_shuffle, parse_label, sample_seed
from vitreg.utils.distributed import rank_and_world

SKIP_REASONS: tuple[str, ...] = (*REASONS, "no_image", "unreadable", "shard_unreadable", "shard_truncated")
SYNTHETIC_KEYS = frozenset({"num_images", "image_size", "num_classes", "class_appearance", "max_distractors"})
_MAX_WORKERS = 64  # rows of the shared skip table: DataLoader worker w counts in row w % 64


# ---------------------------------------------------------------- skips shared with loader workers
class _SharedSkips(SkipCounter):
    """``SkipCounter`` (warns once per shard) that also counts into a row of a shared-memory table, so the
    main process sees what its DataLoader workers skipped."""

    def __init__(self, row: Tensor) -> None:
        super().__init__()
        self.row = row

    def skip(self, reason: str, shard: str, detail: str = "") -> None:
        super().skip(reason, shard, detail)
        self.row[SKIP_REASONS.index(reason)] += 1


# ---------------------------------------------------------------- the dataset
class LabelledImages(IterableDataset):
    """``(transform(image), label, index)`` for the samples of ``source`` owned by this rank and worker.

    ``index`` is the sample's position in the source order; sample ``i`` belongs to rank ``i % world``, and
    within the rank to DataLoader worker ``(i // world) % workers``. ``limit`` keeps the first ``limit``
    samples of the source. ``split``, ``synthetic`` (``num_images``, ``image_size``, ``num_classes``,
    ``class_appearance``, ``max_distractors``) and ``seed`` define the synthetic source; file and shard
    sources ignore ``split`` (pass the split's own folder or shards). A transform with a ``generator``
    parameter (``train_transform``) gets one seeded by ``(seed, epoch, index)``, so augmentations do not
    depend on the world size or the workers; ``set_epoch`` changes them. ``shuffle`` visits each rank and
    worker's samples in an order drawn from ``(seed, epoch)`` (a ``shuffle_buffer``-sample buffer for shards)
    instead of the source order, for training.

    ``skipped`` counts the undecodable samples by reason over this dataset's last pass (all workers).
    ``num_classes`` is the number of class folders, the length of ``classes.json`` next to the shards (if
    present; else the largest label + 1, which needs a scan of the labels) or the synthetic classes.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        transform: Callable[..., Any] | None,
        *,
        rank: int = 0,
        world: int = 1,
        limit: int | None = None,
        split: str = "train",
        synthetic: dict | None = None,
        seed: int = 0,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
    ) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is out of range for world size {world}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of samples or None, got {limit}")
        self.source = os.fspath(source)
        self.transform = transform
        self.transform_takes_generator = accepts_generator(transform)
        self.rank, self.world = rank, world
        self.limit = limit
        self.split = split
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.items: list = []  # file sources: ImageItem per sample
        self.shards: list[str] = []
        self.synthetic: SyntheticShapes | None = None
        self.class_names: list[str] | None = None
        self._num_classes: int | None = None
        self._skip_table = torch.zeros(_MAX_WORKERS, len(SKIP_REASONS), dtype=torch.long).share_memory_()
        if self.source == SYNTHETIC:
            self.kind = SYNTHETIC
            self._init_synthetic(synthetic or {}, split, seed)
        elif synthetic is not None:
            raise ValueError(f"synthetic={synthetic} is only used with source='synthetic', not {self.source!r}")
        else:
            self._init_path(self.source)

    # -------------------------------------------------------------- sources
    def _init_synthetic(self, options: dict, split: str, seed: int) -> None:
        unknown = set(options) - SYNTHETIC_KEYS
        if unknown:
            raise ValueError(
                f"unknown synthetic option(s) {sorted(unknown)}; expected some of {sorted(SYNTHETIC_KEYS)}"
            )
        options = {"num_images": 1000, **options}
        self.synthetic = SyntheticShapes(seed=seed, split=split, **options)
        self.class_names = list(self.synthetic.class_names)
        self._num_classes = self.synthetic.num_classes

    def _init_path(self, spec: str) -> None:
        source = image_source(spec, labelled=True)
        self.kind = source.kind
        self.items, self.shards = list(source.items), list(source.shards)
        self.class_names = list(source.class_names) if source.class_names is not None else None
        self._num_classes = len(self.class_names) if self.class_names is not None else None
        if self.kind == "files" and self.limit is not None:
            self.items = self.items[: self.limit]
        if self.kind == "shards":
            self._check_shards()

    def _check_shards(self) -> None:
        missing = missing_shards(self.shards)
        if missing:
            raise ValueError(
                f"{len(missing)} shard(s) of {self.source!r} do not exist, e.g. {missing[0]}; {SOURCE_HELP}"
            )
        # Fail now, on every rank, if the shards carry no labels (rather than later, inside one worker).
        first = self.shards[0]
        if local_shard_path(first) is not None:
            samples = shard_samples(first, SkipCounter(), lambda p: p == 0, frozenset({"cls", "cls.txt"}))
            try:
                sample = next(samples, None)
            finally:
                samples.close()
            if sample is not None:
                self._require_label(sample, parse_label(sample))

    def _require_label(self, sample: dict[str, Any], label: int) -> None:
        if label < 0:
            raise ValueError(
                f"sample {sample.get('__key__')} of {sample.get('__url__', self.source)} has no 'cls' label; "
                "evaluation needs labelled shards (write them from a class-folder tree or a labelled list with "
                "scripts/make_shards.py)"
            )

    # -------------------------------------------------------------- sizes and counts
    @property
    def num_samples(self) -> int | None:
        """Samples in the source (after ``limit``); None for shards, whose size is known only once read."""
        if self.kind == "synthetic":
            n = len(self.synthetic)
            return min(n, self.limit) if self.limit is not None else n
        if self.kind == "files":
            return len(self.items)
        return None

    def __len__(self) -> int:
        """This rank's samples (file and synthetic sources; shards have no length)."""
        n = self.num_samples
        if n is None:
            raise TypeError("a shard source has no length before it is read")
        return len(range(self.rank, n, self.world))

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:  # shards without classes.json: scan every label once
            top = -1
            wanted = frozenset({"cls", "cls.txt"})
            for index, sample in enumerate(self._all_shard_samples(SkipCounter(), lambda _: True, wanted)):
                if self.limit is not None and index >= self.limit:
                    break
                if sample is not None:
                    top = max(top, parse_label(sample))
            if top < 0:
                raise ValueError(f"no labelled sample in {self.source}; {SOURCE_HELP}")
            self._num_classes = top + 1
        return self._num_classes

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples (and shards) by reason in the last pass, summed over this rank's workers."""
        return dict(zip(SKIP_REASONS, self._skip_table.sum(0).tolist(), strict=True))

    def set_epoch(self, epoch: int) -> None:
        """New augmentations (and order, with ``shuffle``) for the next pass; set it before the loader
        starts its workers (``persistent_workers=False``)."""
        self.epoch = epoch

    # -------------------------------------------------------------- iteration
    def _position(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _owns(self, index: int, worker: int, workers: int) -> bool:
        return index % self.world == self.rank and (index // self.world) % workers == worker

    def _owned_indices(self, n: int, worker: int, workers: int) -> list[int]:
        return list(range(self.rank, n, self.world))[worker::workers]

    def _all_shard_samples(
        self, skips: SkipCounter, owned: Callable[[int], bool], exts: frozenset[str] | None = None
    ) -> Iterator[dict[str, Any] | None]:
        """Samples of all shards in order (None for those not ``owned(index)``), numbering across shards."""
        start = 0
        for url in self.shards:
            count = 0
            for sample in shard_samples(url, skips, lambda p, s=start: owned(s + p), exts):
                count += 1
                yield sample
            start += count

    def _load(self, index: int, skips: SkipCounter) -> tuple[Tensor, int] | None:
        """(uint8 image, label) of a file or synthetic sample, None when it cannot be decoded."""
        if self.kind == "synthetic":
            return self.synthetic[index]
        item = self.items[index]
        try:
            data = Path(item.path).read_bytes()
        except OSError as err:
            skips.skip("unreadable", self.source, f"{item.path}: {err}")
            return None
        try:
            return decode_image(data), item.label
        except DecodeError as err:
            skips.skip(err.reason, self.source, f"{item.path}: {err}")
            return None

    def _decode_sample(self, sample: dict[str, Any], skips: SkipCounter) -> tuple[Tensor, int] | None:
        url = sample["__url__"]
        if sample.get("__error__"):
            skips.skip(sample["__error__"], url, f"sample {sample['__key__']}")
            return None
        self._require_label(sample, parse_label(sample))
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            skips.skip("no_image", url, f"sample {sample['__key__']} has {sorted(k for k in sample if k[0] != '_')}")
            return None
        try:
            return decode_image(sample[ext]), parse_label(sample)
        except DecodeError as err:
            skips.skip(err.reason, url, f"{sample['__key__']}: {err}")
            return None

    def _rng(self, worker: int) -> random.Random:
        return random.Random(f"eval-order/{self.seed}/{self.epoch}/{self.rank}/{worker}")

    def _shard_stream(self, skips: SkipCounter, worker: int, workers: int) -> Iterator[tuple[int, dict[str, Any]]]:
        def owned(index: int) -> bool:
            return self._owns(index, worker, workers) and (self.limit is None or index < self.limit)

        for index, sample in enumerate(self._all_shard_samples(skips, owned)):
            if self.limit is not None and index >= self.limit:
                break
            if sample is not None:
                yield index, sample

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        worker, workers = self._position()
        row = self._skip_table[worker % _MAX_WORKERS]
        row.zero_()
        skips = _SharedSkips(row)
        generator = torch.Generator() if self.transform_takes_generator else None
        if self.kind == "shards":
            stream = self._shard_stream(skips, worker, workers)
            if self.shuffle:
                stream = buffer_shuffle(stream, self.shuffle_buffer, self._rng(worker))
            loaded = ((index, self._decode_sample(sample, skips)) for index, sample in stream)
        else:
            indices = self._owned_indices(self.num_samples, worker, workers)
            if self.shuffle:
                self._rng(worker).shuffle(indices)
            loaded = ((index, self._load(index, skips)) for index in indices)
        for index, result in loaded:
            if result is None:
                continue
            image, label = result
            if self.transform is not None:
                if generator is not None:
                    generator.manual_seed(sample_seed(self.seed, 0, 0, self.epoch, index))
                    image = self.transform(image, generator=generator)
                else:
                    image = self.transform(image)
            yield image, int(label), index


def collate_labelled(samples: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """``(images (B, 3, H, W), labels (B,), indices (B,))``."""
    images, labels, indices = zip(*samples, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long)


def eval_loader(
    source: str | os.PathLike,
    transform: Callable[..., Any] | None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    limit: int | None = None,
    split: str = "train",
    synthetic: dict | None = None,
    seed: int = 0,
    shuffle: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader of ``(images, labels, indices)`` batches over this rank's share of ``source``
    (``rank_and_world()``); see ``LabelledImages``. Not ``drop_last``: every sample is read."""
    rank, world = rank_and_world()
    dataset = LabelledImages(
        source,
        transform,
        rank=rank,
        world=world,
        limit=limit,
        split=split,
        synthetic=synthetic,
        seed=seed,
        shuffle=shuffle,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_labelled,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=False,
    )

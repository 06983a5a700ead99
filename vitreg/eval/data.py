"""Labelled images for evaluation: DINOv2's classification transforms and a rank-split labelled dataset.

Sources (``LabelledImages``), each read in one deterministic order in which sample ``i`` has index ``i``:

* a class-folder tree ``root/<class>/<image>`` (labels: the sorted class folder names, ``find_images``);
* a list file, one ``path<TAB>label`` per line (relative paths from the file's folder);
* WebDataset shards with a ``cls`` label per sample: a ``.tar``, a folder of ``.tar`` files or a brace
  pattern ``shards/val-{000000..000003}.tar`` (shards in order, samples in tar order);
* ``"synthetic"``: ``SyntheticShapes``, whose ``train`` and ``val`` splits are disjoint random streams.

Sample ``i`` is read by rank ``i % world`` only, so the ranks together see each sample exactly once (no
padding, unlike ``DistributedSampler``); inside a rank the DataLoader workers split the rank's samples
again. ``vitreg.eval.distributed.gather_in_order`` puts the rows back in source order. Undecodable images
are skipped and counted (``LabelledImages.skipped``), never fatal; an unlabelled sample is an error, since
evaluation needs labels. Local shards are walked header by header, so a process reads the bytes of its
own samples only.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitreg.data.decode import REASONS, DecodeError, decode_image
from vitreg.data.shards import IMAGE_EXTENSIONS as FILE_IMAGE_EXTENSIONS
from vitreg.data.shards import detect_kind, find_images, list_shards
from vitreg.data.synthetic import SyntheticShapes
from vitreg.data.transforms import normalize, random_horizontal_flip, random_resized_crop
from vitreg.data.webdataset import (
    IMAGE_EXTENSIONS,
    SkipCounter,
    _split_key,
    buffer_shuffle,
    iter_tar_samples,
    parse_label,
    sample_seed,
)
from vitreg.utils.distributed import rank_and_world

# DINOv2 evaluates at 224 px after resizing the shorter side to 256: the same ratio at other resolutions.
RESIZE_RATIO = 256 / 224
SKIP_REASONS: tuple[str, ...] = (*REASONS, "no_image", "unreadable", "shard_unreadable", "shard_truncated")
SYNTHETIC_KEYS = frozenset({"num_images", "image_size", "num_classes", "class_appearance", "max_distractors"})
SOURCE_HELP = (
    "pass a class-folder tree (root/<class>/<image>), a list file (path<TAB>label lines), labelled WebDataset "
    "shards (a .tar, a folder of .tar files or a brace pattern such as shards/val-{000000..000009}.tar) or "
    "'synthetic'"
)
_MAX_WORKERS = 64  # rows of the shared skip table: DataLoader worker w counts in row w % 64


# ---------------------------------------------------------------- transforms
def _resize_shorter(img: Tensor, size: int) -> Tensor:
    """Shorter side to ``size`` (the longer scaled and truncated, as torchvision's ``Resize(int)``), bicubic
    antialiased like PIL's; float result in [0, 1]. uint8 input is resampled in uint8, rounding like PIL."""
    height, width = img.shape[-2:]
    out_hw = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    if img.dtype == torch.uint8:
        x = img[None].contiguous(memory_format=torch.channels_last)
        out = F.interpolate(x, size=out_hw, mode="bicubic", antialias=True, align_corners=False)[0]
        return out.float().div_(255.0)
    out = F.interpolate(img[None].float(), size=out_hw, mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 1.0)


def _center_crop(img: Tensor, size: int) -> Tensor:
    """torchvision's ``CenterCrop`` offsets: ``int(round((side - size) / 2))`` (images are never smaller here)."""
    height, width = img.shape[-2:]
    top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    return img[..., top : top + size, left : left + size].contiguous()


class ClassificationEvalTransform:
    """DINOv2's ``make_classification_eval_transform``: shorter side to ``resize_size`` (bicubic,
    antialiased), centre crop ``resolution``, ImageNet normalisation. uint8 ``(3, H, W)`` in, float out."""

    def __init__(self, resolution: int = 224, resize_size: int | None = None) -> None:
        self.resolution = resolution
        self.resize_size = resize_size or round(resolution * RESIZE_RATIO)
        if self.resize_size < resolution:
            raise ValueError(f"resize_size {self.resize_size} is smaller than the crop {resolution}")

    def __call__(self, img: Tensor) -> Tensor:
        return normalize(_center_crop(_resize_shorter(img, self.resize_size), self.resolution))


class ClassificationTrainTransform:
    """DINOv2's ``make_classification_train_transform`` (linear-probe training): RandomResizedCrop
    (bicubic, scale (0.08, 1), ratio (3/4, 4/3)), horizontal flip with p=0.5, ImageNet normalisation.
    Random draws come from ``generator`` (torch's global RNG when None)."""

    def __init__(
        self,
        resolution: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
    ) -> None:
        self.resolution = resolution
        self.scale = scale
        self.ratio = ratio
        self.hflip_prob = hflip_prob

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        crop = random_resized_crop(img, self.resolution, self.scale, self.ratio, generator)
        if self.hflip_prob > 0:
            crop = random_horizontal_flip(crop, self.hflip_prob, generator)
        return normalize(crop)


def eval_transform(resolution: int = 224) -> Callable[[Tensor], Tensor]:
    """Resize the shorter side to ``round(resolution * 256 / 224)``, centre crop, normalise."""
    return ClassificationEvalTransform(resolution)


def train_transform(resolution: int = 224) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """RandomResizedCrop + horizontal flip + normalise, drawing from the generator it is given."""
    return ClassificationTrainTransform(resolution)


def _takes_generator(transform: Callable[..., Any] | None) -> bool:
    if transform is None:
        return False
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


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


# ---------------------------------------------------------------- reading shards
def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_tar_samples(
    path: str, skips: SkipCounter, wanted: Callable[[int], bool], exts: frozenset[str] | None = None
) -> Iterator[dict[str, Any] | None]:
    """Every sample of a local tar in order: a dict (extension -> bytes, ``__key__``, ``__url__``) when
    ``wanted(position)``, else None. Member data is read only for wanted samples (and only ``exts`` when
    given); the rest is seeked over. A short read marks the sample ``__error__ = "truncated"``; an
    unreadable or truncated archive ends with a counted skip. Positions depend on headers only, so every
    process numbers the samples of a shard the same way, whatever it reads."""
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 -- closed by the `with` below, after the check
    except (OSError, tarfile.TarError) as err:
        skips.skip("shard_unreadable", path, str(err))
        return

    def read(key: str, members: list[tarfile.TarInfo]) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": key, "__url__": path}
        for member in members:
            ext = _split_key(member.name)[1]
            if exts is not None and ext not in exts:
                continue
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                sample["__error__"] = "truncated"
            sample[ext] = data
        return sample

    with tar:
        position, key, members = 0, None, []
        try:
            for member in tar:  # seekable mode: next() skips the data of unread members
                if not member.isfile():
                    continue
                member_key = _split_key(member.name)[0]
                if key is not None and member_key != key:
                    yield read(key, members) if wanted(position) else None
                    position, members = position + 1, []
                key = member_key
                members.append(member)
            if key is not None:
                yield read(key, members) if wanted(position) else None
        except (OSError, EOFError, tarfile.TarError) as err:
            skips.skip("shard_truncated", path, str(err))


def _shard_samples(
    url: str, skips: SkipCounter, wanted: Callable[[int], bool], exts: frozenset[str] | None = None
) -> Iterator[dict[str, Any] | None]:
    """``_local_tar_samples`` for files; remote URLs are streamed whole with ``iter_tar_samples``."""
    if _is_local(url):
        yield from _local_tar_samples(url, skips, wanted, exts)
        return
    for position, sample in enumerate(iter_tar_samples(url, skips)):
        yield sample if wanted(position) else None


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
        self.transform_takes_generator = _takes_generator(transform)
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
        if self.source == "synthetic":
            self.kind = "synthetic"
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

    def _init_path(self, source: str) -> None:
        if not _is_local(source) or (any(c in source for c in "{*?[") and not os.path.exists(source)):
            self.kind = "shards"
            try:
                self.shards = list_shards(source)
            except FileNotFoundError:
                raise ValueError(f"no shards match {source!r}; {SOURCE_HELP}") from None
            missing = [s for s in self.shards if _is_local(s) and not os.path.isfile(s)]
            if missing:
                raise ValueError(
                    f"{len(missing)} shard(s) of {source!r} do not exist, e.g. {missing[0]}; {SOURCE_HELP}"
                )
        else:
            path = Path(source)
            if not path.exists():
                raise ValueError(f"evaluation source {source} does not exist; {SOURCE_HELP}")
            if path.is_file() and path.name.endswith(".tar"):
                self.kind, self.shards = "shards", [str(path)]
            elif path.is_dir() and any(p.suffix == ".tar" and not p.name.startswith(".") for p in path.iterdir()):
                self.kind, self.shards = "shards", list_shards(path)
            else:
                self.kind = "files"
                self._init_files(path)
                return
        self._init_shards()

    def _init_files(self, path: Path) -> None:
        kind = detect_kind(path)
        if kind == "flat":
            raise ValueError(
                f"{path} holds images without class folders, but evaluation needs labels: put them in "
                f"{path}/<class>/<image> folders or list them with labels (path<TAB>label); {SOURCE_HELP}"
            )
        self.items, self.class_names = find_images(path, kind)
        if not self.items:
            raise ValueError(f"no images in {path} (extensions {sorted(FILE_IMAGE_EXTENSIONS)}); {SOURCE_HELP}")
        if self.class_names is None:
            raise ValueError(f"{path} lists images without labels; evaluation needs 'path<TAB>label' lines")
        self._num_classes = len(self.class_names)
        if self.limit is not None:
            self.items = self.items[: self.limit]

    def _init_shards(self) -> None:
        first = self.shards[0]
        classes = Path(first).parent / "classes.json" if _is_local(first) else None
        if classes is not None and classes.is_file():
            self.class_names = [str(c) for c in json.loads(classes.read_text())]
            self._num_classes = len(self.class_names)
        # Fail now, on every rank, if the shards carry no labels (rather than later, inside one worker).
        if _is_local(first):
            samples = _local_tar_samples(first, SkipCounter(), lambda p: p == 0, frozenset({"cls", "cls.txt"}))
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
            for sample in _shard_samples(url, skips, lambda p, s=start: owned(s + p), exts):
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

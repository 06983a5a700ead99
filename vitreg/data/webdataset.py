"""Streaming WebDataset shards into training samples, split across ranks and loader workers.

Each (rank, worker) pair reads its own stream:
- ``resampled=True`` (training default): an infinite stream where every (rank, worker) draws shards
  with replacement from its own RNG seeded by ``(seed, rank, worker)``, so streams differ
  between ranks and workers and the same seed reproduces them. An "epoch" is a step count
  (DINOv2's ``OFFICIAL_EPOCH_LENGTH``), set on the trainer, not here.
- ``resampled=False``: every shard once, ``shards[rank::world][worker::workers]`` (evaluation).

Bad data never stops the stream: unreadable shards, truncated tars and undecodable images are
skipped and counted by reason in ``SkipCounter`` (per worker; the collate forwards the counts with
each batch). Only a stream in which no shard yields anything raises.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from vitreg.data.decode import DecodeError, decode_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class SkipCounter:
    """Skipped samples and shards by reason, in this process (one per loader worker)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.seen = 0
        self._reported: Counter[str] = Counter()
        self._seen_reported = 0
        self._warned_shards: set[str] = set()

    def skip(self, reason: str, shard: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if shard not in self._warned_shards:  # warn once per shard, count every time
            self._warned_shards.add(shard)
            log.warning(
                "skipping bad data in %s (%s%s); further problems in this shard are only counted",
                shard,
                reason,
                f": {detail}" if detail else "",
            )

    def take_new(self) -> tuple[dict[str, int], int]:
        """Skips by reason and samples seen since the last call (what a batch reports)."""
        new, seen = self.counts - self._reported, self.seen - self._seen_reported
        self._reported, self._seen_reported = Counter(self.counts), self.seen
        return dict(new), seen


SKIPS = SkipCounter()  # per process: each DataLoader worker has its own copy


T = TypeVar("T")


def buffer_shuffle(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """WebDataset's streaming shuffle: keep ``size`` items, emit a random one as each new item arrives,
    then the shuffled rest. Deterministic for a seeded ``rng`` (exact resume replays it)."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def rank_and_world() -> tuple[int, int]:
    """The global rank and world size: torch.distributed when initialised, else RANK/WORLD_SIZE
    (torchrun), else SLURM_PROCID/SLURM_NTASKS (srun), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key])
    return 0, 1


def _split_key(name: str) -> tuple[str, str]:
    """``dir/abc.cls.txt`` -> (``dir/abc``, ``cls.txt``): WebDataset's key/extension convention."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_samples(url: str, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples (dicts of extension -> bytes, plus ``__key__``/``__url__``) of one shard, in order.

    An unreadable or truncated shard ends its own stream with a counted skip, never an exception.
    """
    import webdataset as wds

    try:
        stream = wds.gopen(url)
    except Exception as err:  # missing file, permission, unreachable URL
        skips.skip("shard_unreadable", url, str(err))
        return
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # stream-mode tarfile returns short reads silently
                    raise EOFError(f"{member.name}: {len(data)} of {member.size} bytes before the end of the file")
                current[ext] = data
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError) as err:  # truncated or corrupt tar: keep what was read
        # (a cut inside a member's data is caught above; stream-mode tarfile ends silently on a cut header)
        skips.skip("shard_truncated", url, str(err))
    finally:
        stream.close()


def parse_label(sample: dict[str, Any]) -> int:
    """The integer class from ``cls`` (or ``cls.txt``), -1 when the sample has none."""
    raw = sample.get("cls", sample.get("cls.txt"))
    if raw is None:
        return -1
    try:
        return int(raw.decode().strip())
    except ValueError:
        return -1


def sample_seed(seed: int, rank: int, worker: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a pure function of its place in the stream, so a resumed
    stream draws the same crops without replaying the samples before it."""
    return random.Random(f"sample/{seed}/{rank}/{worker}/{epoch}/{index}").getrandbits(63)


class ShardStream(IterableDataset):
    """``(transform(image), label)`` samples from WebDataset shards; see the module docstring.

    Order of operations per (rank, worker): shards -> raw samples (bytes) -> shuffle buffer -> decode
    -> transform. The buffer holds raw bytes, and each sample leaving it gets an index ``j`` in
    that worker's stream; its augmentation draws from a generator seeded by ``sample_seed(..., j)``
    when the transform accepts ``generator=``. So a stream can be resumed exactly: skip the first
    ``start_positions[worker]`` buffer outputs without decoding them.

    Exact resume across loader workers: DataLoader takes batch t from worker ``t % workers``. A
    resumed loader starts again at worker 0, so ``worker_offset`` renames the workers: physical
    worker p plays the logical worker ``(p + worker_offset) % workers``, whose seeds and position
    it uses. With ``with_position`` samples are ``(sample, label, (rank, logical worker, j))``.
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: Callable[..., Any] | None = None,
        *,
        seed: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        min_side: int = 1,
        draft_side: int | None = None,
        rank_world: tuple[int, int] | None = None,
        with_position: bool = False,
        worker_offset: int = 0,
        start_positions: dict[int, int] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("data.webdataset.shards: no shards given (a brace pattern, a list, or a folder of .tar)")
        self.shards = list(shards)
        self.transform = transform
        self.transform_takes_generator = _accepts_generator(transform)
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.min_side = min_side
        self.draft_side = draft_side
        self.with_position = with_position
        self.worker_offset = worker_offset
        self.start_positions = dict(start_positions or {})
        self.epoch = 0  # part of every seed: set it between passes for a new order of the same shards
        # Resolved here, in the rank's main process: DataLoader workers do not see the process
        # group (and under Lightning's launcher or srun not RANK either).
        self.rank, self.world = rank_world or rank_and_world()

    def _stream_position(self) -> tuple[int, int, int, int]:
        """(rank, world, logical worker, workers) of the calling process."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank, self.world, (worker + self.worker_offset) % workers, workers

    def _shard_order(self, rng: random.Random, rank: int, world: int, worker: int, workers: int) -> Iterator[str]:
        if self.resampled:
            while True:
                yield rng.choice(self.shards)
        else:
            mine = self.shards[rank::world][worker::workers]
            rng.shuffle(mine)
            yield from mine

    def _raw_samples(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        # str seeds are hashed with SHA-512 by random.Random: stable across processes (unlike hash())
        rng = random.Random(f"shards/{self.seed}/{rank}/{worker}/{self.epoch}")
        consecutive_empty = 0
        for url in self._shard_order(rng, rank, world, worker, workers):
            produced = 0
            for sample in iter_tar_samples(url, SKIPS):
                produced += 1
                yield sample
            consecutive_empty = 0 if produced else consecutive_empty + 1
            if consecutive_empty >= max(len(self.shards), 1) * (3 if self.resampled else 1):
                raise RuntimeError(
                    f"no readable sample in {consecutive_empty} shard reads in a row (rank {rank}, worker {worker}); "
                    f"first shards: {self.shards[:3]}. Check data.webdataset.shards; skipped so far: {dict(SKIPS.counts)}"
                )

    def _decode(self, sample: dict[str, Any], generator: torch.Generator | None) -> Any | None:
        url = sample["__url__"]
        SKIPS.seen += 1
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
            SKIPS.skip("no_image", url, f"sample {sample['__key__']} has {sorted(sample)}")
            return None
        try:
            image = decode_image(sample[image_ext], min_side=self.min_side, draft_side=self.draft_side)
        except DecodeError as err:
            SKIPS.skip(err.reason, url, f"{sample['__key__']}: {err}")
            return None
        if self.transform is None:
            return image
        return self.transform(image, generator=generator) if generator is not None else self.transform(image)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        rank, world, worker, workers = self._stream_position()
        rng = random.Random(f"buffer/{self.seed}/{rank}/{worker}/{self.epoch}")
        start = self.start_positions.get(worker, 0)
        generator = torch.Generator() if self.transform_takes_generator else None
        for j, sample in enumerate(
            buffer_shuffle(self._raw_samples(rank, world, worker, workers), self.shuffle_buffer, rng)
        ):
            if j < start:  # resuming: these were consumed before the checkpoint; skip without decoding
                continue
            if generator is not None:
                generator.manual_seed(sample_seed(self.seed, rank, worker, self.epoch, j))
            out = self._decode(sample, generator)
            if out is None:
                continue
            label = parse_label(sample)
            yield (out, label, (rank, worker, j)) if self.with_position else (out, label)


def _accepts_generator(transform: Callable[..., Any] | None) -> bool:
    if transform is None:
        return False
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False

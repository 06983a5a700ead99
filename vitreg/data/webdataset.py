"""Streaming WebDataset shards into training samples, split across ranks and loader workers.

Each (rank, worker) pair reads its own stream:
- ``resampled=True`` (training default): an infinite stream where every (rank, worker) draws shards
  with replacement from its own RNG seeded by ``(seed, rank, worker)``, so streams differ
  between ranks and workers and the same seed reproduces them. An "epoch" is a step count
  (DINOv2's ``OFFICIAL_EPOCH_LENGTH``), set on the trainer, not here.
- ``resampled=False``: every shard once, ``shards[rank::world][worker::workers]`` (evaluation).

Bad data does not stop a healthy stream: unreadable shards, truncated tars and undecodable, too small
or missing images are skipped and counted by reason in ``SkipCounter`` (per worker; the collate
forwards the counts with each batch). A stream that cannot make progress raises ``UnusableDataError``
instead of waiting forever for a batch that never comes: no shard yields a sample, or
``max_unusable_in_a_row`` samples in a row were unusable while the worker's unusable fraction is above
``max_skip_fraction`` (or it has found no usable sample at all). The message names the reasons and the
keys to change.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vitreg.data.decode import IMAGE_EXTENSIONS, DecodeError, decode_image
from vitreg.data.tar import SkipCounter, iter_tar_samples
from vitreg.data.transforms import accepts_generator
from vitreg.utils.distributed import rank_and_world

log = logging.getLogger(__name__)

SKIPS = SkipCounter()  # per process: each DataLoader worker has its own copy


class UnusableDataError(RuntimeError):
    """A stream that cannot produce training samples (every shard missing, or every sample unusable).

    A ``RuntimeError`` taking one message, so a DataLoader worker re-raises it as itself in the main process.
    """

    def reason(self) -> str:
        """The message without the worker's traceback that a DataLoader puts in front of it."""
        return str(self).rsplit(f"{type(self).__name__}: ", 1)[-1].strip()


# What to change, for each reason a sample is unusable (decode.REASONS plus ``no_image``).
_FIXES = {
    "too_small": "images under {min_side} px on a side, the least the crops accept: use larger images or lower "
    "augment.local_crops_size (data.webdataset.min_image_side when set)",
    "too_large": "images above the decoder's pixel limit: resize them when making the shards (scripts/make_shards.py)",
    "no_image": "samples without an image member (jpg, png, ...): check that data.webdataset.shards names image shards",
}
_DAMAGED = "damaged or non-image files: check data.webdataset.shards, or re-make the shards with scripts/make_shards.py"


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

    Unusable samples (undecodable, smaller than ``min_side``, no image) are skipped and counted; after
    ``max_unusable_in_a_row`` of them in a row the stream raises ``UnusableDataError`` if more than
    ``max_skip_fraction`` of what this worker read was unusable (always when nothing was usable), so a
    stream that can never fill a batch stops with the reasons instead of hanging. A long bad patch in an
    otherwise healthy stream (one damaged shard late in a run) keeps going. ``None`` turns the bound off.
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
        max_unusable_in_a_row: int | None = 1000,
        max_skip_fraction: float = 0.05,
    ) -> None:
        if not shards:
            raise ValueError("data.webdataset.shards: no shards given (a brace pattern, a list, or a folder of .tar)")
        self.shards = list(shards)
        self.transform = transform
        self.transform_takes_generator = accepts_generator(transform)
        # A transform that works channels-last anyway (MultiCropTransform) gets the decoder's HWC memory
        # as it is, instead of a CHW copy that it would copy back.
        self.channels_last = bool(getattr(transform, "accepts_channels_last", False))
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.min_side = min_side
        self.draft_side = draft_side
        self.with_position = with_position
        self.worker_offset = worker_offset
        self.start_positions = dict(start_positions or {})
        if max_unusable_in_a_row is not None and max_unusable_in_a_row < 1:
            raise ValueError(f"data.webdataset.max_unusable_in_a_row must be >= 1, got {max_unusable_in_a_row}")
        self.max_unusable_in_a_row = max_unusable_in_a_row  # None: never stop on unusable samples
        self.max_skip_fraction = max_skip_fraction
        self.epoch = 0  # part of every seed: set it between passes for a new order of the same shards
        # Resolved here, in the rank's main process: DataLoader workers do not see the process
        # group (and under Lightning's launcher or srun not RANK either).
        self.rank, self.world = rank_world or rank_and_world(launcher_env=True)

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
                raise UnusableDataError(
                    f"no readable sample in {consecutive_empty} shard reads in a row (rank {rank}, worker {worker}); "
                    f"first shards: {self.shards[:3]}. Check data.webdataset.shards; skipped so far: {dict(SKIPS.counts)}"
                )

    def _decode(self, sample: dict[str, Any], generator: torch.Generator | None) -> tuple[Any | None, str | None]:
        """(transformed image, None), or (None, reason) for an unusable sample (counted in ``SKIPS``)."""
        url = sample["__url__"]
        SKIPS.seen += 1
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
            SKIPS.skip("no_image", url, f"sample {sample['__key__']} has {sorted(sample)}")
            return None, "no_image"
        try:
            image = decode_image(
                sample[image_ext], min_side=self.min_side, draft_side=self.draft_side, channels_last=self.channels_last
            )
        except DecodeError as err:
            SKIPS.skip(err.reason, url, f"{sample['__key__']}: {err}")
            return None, err.reason
        if self.transform is None:
            return image, None
        return (self.transform(image, generator=generator) if generator is not None else self.transform(image)), None

    def _unusable_error(
        self, rank: int, worker: int, run: Counter[str], unusable: int, seen: int, last_shard: str
    ) -> UnusableDataError:
        reasons = ", ".join(f"{reason} {n}" for reason, n in run.most_common())
        fixes = [f"{reason}: {_FIXES.get(reason, _DAMAGED).format(min_side=self.min_side)}" for reason in run]
        return UnusableDataError(
            f"the data stream of rank {rank}, loader worker {worker} found no usable sample in the last "
            f"{sum(run.values())} samples it read ({reasons}; {unusable} of the {seen} samples it read were "
            f"unusable; last shard {last_shard}, first shards {self.shards[:2]}), so no batch can be made. "
            f"What to change: {'; '.join(fixes)}. To accept more unusable data, raise data.webdataset.max_skip_fraction "
            f"(now {self.max_skip_fraction}) and data.webdataset.max_unusable_in_a_row (now {self.max_unusable_in_a_row})."
        )

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        rank, world, worker, workers = self._stream_position()
        rng = random.Random(f"buffer/{self.seed}/{rank}/{worker}/{self.epoch}")
        start = self.start_positions.get(worker, 0)
        generator = torch.Generator() if self.transform_takes_generator else None
        # Unusable samples are counted here, in the stream: a worker that only finds unusable samples
        # never yields a batch, so nothing downstream (DataHealth runs at batch end) would ever see them.
        run: Counter[str] = Counter()  # reasons of the unusable samples since the last usable one
        seen = unusable = 0
        for j, sample in enumerate(
            buffer_shuffle(self._raw_samples(rank, world, worker, workers), self.shuffle_buffer, rng)
        ):
            if j < start:  # resuming: these were consumed before the checkpoint; skip without decoding
                continue
            if generator is not None:
                generator.manual_seed(sample_seed(self.seed, rank, worker, self.epoch, j))
            out, reason = self._decode(sample, generator)
            seen += 1
            if reason is not None:
                unusable += 1
                run[reason] += 1
                bound = self.max_unusable_in_a_row
                if (
                    bound is not None
                    and sum(run.values()) >= bound
                    and (unusable == seen or unusable > self.max_skip_fraction * seen)
                ):
                    raise self._unusable_error(rank, worker, run, unusable, seen, sample["__url__"])
                continue
            run.clear()
            label = parse_label(sample)
            yield (out, label, (rank, worker, j)) if self.with_position else (out, label)

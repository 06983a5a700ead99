"""Reading WebDataset tar shards: the one tar reader of the training stream, evaluation and probe images.

A shard is a tar whose members ``dir/key.ext`` group into samples (dicts of extension -> bytes, plus
``__key__`` and ``__url__``) by key, in tar order. Two modes of reading it:

- ``iter_tar_samples`` streams any URL (local file, ``pipe:``, ``http://``, ...) front to back and
  returns every sample whole (the training stream, which reads everything anyway);
- ``shard_samples`` numbers the samples of a shard and reads only the wanted ones: a local file is
  walked header by header, seeking over the data of unwanted samples (so each evaluation process reads
  the bytes of its own samples only); a remote URL is streamed with ``iter_tar_samples``.

Bad data never raises: an unreadable or truncated shard ends its samples with a skip counted by reason
in a ``SkipCounter`` (one per process), which warns once per shard.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from vitreg.data.shards import local_shard_path

log = logging.getLogger(__name__)


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


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.cls.txt`` -> (``dir/abc``, ``cls.txt``): WebDataset's key/extension convention."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_samples(url: str, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples of one shard, in order, streamed whole (see the module docstring).

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
                key, ext = split_key(member.name)
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


def _local_tar_samples(
    path: str, skips: SkipCounter, wanted: Callable[[int], bool], exts: frozenset[str] | None = None
) -> Iterator[dict[str, Any] | None]:
    """``shard_samples`` of a local file: member data is read only for wanted samples (and only ``exts``
    when given); the rest is seeked over. Positions depend on headers only, so every process numbers the
    samples of a shard the same way, whatever it reads."""
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 -- closed by the `with` below, after the check
    except (OSError, tarfile.TarError) as err:
        skips.skip("shard_unreadable", path, str(err))
        return

    def read(key: str, members: list[tarfile.TarInfo]) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": key, "__url__": path}
        for member in members:
            ext = split_key(member.name)[1]
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
                member_key = split_key(member.name)[0]
                if key is not None and member_key != key:
                    yield read(key, members) if wanted(position) else None
                    position, members = position + 1, []
                key = member_key
                members.append(member)
            if key is not None:
                yield read(key, members) if wanted(position) else None
        except (OSError, EOFError, tarfile.TarError) as err:
            skips.skip("shard_truncated", path, str(err))


def shard_samples(
    url: str, skips: SkipCounter, wanted: Callable[[int], bool], exts: frozenset[str] | None = None
) -> Iterator[dict[str, Any] | None]:
    """Every sample of a shard in order: a dict when ``wanted(position)``, else None (see the module
    docstring). A local sample whose member data ends early is marked ``__error__ = "truncated"``."""
    path = local_shard_path(url)
    if path is not None:
        yield from _local_tar_samples(path, skips, wanted, exts)
        return
    for position, sample in enumerate(iter_tar_samples(url, skips)):
        yield sample if wanted(position) else None

"""Pack an image folder or file list into WebDataset tar shards (``{prefix}-000000.tar``, ...).

Each sample holds ``jpg`` (the image), ``cls`` (the label as ASCII digits, labelled sources only) and
``json`` (source path, original width/height, label, class name). JPEG inputs are stored byte for byte
unless a resize is asked for; everything else is decoded, converted to RGB and re-encoded as JPEG.
Decoding runs in worker processes; the parent writes, in an order fixed by ``seed`` alone.

Sources (``find_images``):

* ``tree``: ``root/<class>/<...>/<image>``, ImageNet style. Classes are the sorted subfolder names, so
  label ids are ``0..C-1`` in that order.
* ``flat``: every image under ``root``, recursively, unlabelled.
* ``list``: a text file, one image per line: ``path``, ``path<TAB>label`` or ``path label`` (integer
  label). Relative paths resolve against the list file's folder; blank lines and ``#`` lines are skipped.
"""

from __future__ import annotations

import glob
import io
import json
import math
import multiprocessing
import os
import random
import re
import stat
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image, UnidentifiedImageError

from vitreg.data.decode import IMAGE_EXTENSIONS

KINDS = ("tree", "flat", "list")
JPEG_MAGIC = b"\xff\xd8\xff"

# tar layout (what ShardWriter's payload-only ``maxsize`` ignores): a 512-byte header per member, data
# padded to 512, two zero blocks at the end, and the whole archive padded to a 10240-byte record.
_BLOCK, _RECORD = 512, 10240
_MAX_STEM = 64  # keeps ``key.json`` well under USTAR's 100-character member names
_SHARD_RE = r"-\d{6}\.tar"


@dataclass(frozen=True)
class ImageItem:
    """One input image: where it is, its label (None when unlabelled) and the path to record in ``json``."""

    path: str
    label: int | None = None
    relpath: str | None = None


@dataclass
class ShardSummary:
    """What ``write_shards`` did. ``skipped`` maps each skipped input path to ``"<reason>: <detail>"``."""

    images_written: int = 0
    shards: list[str] = field(default_factory=list)
    bytes_written: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    class_names: list[str] | None = None
    pattern: str = ""  # brace pattern of all shards, e.g. ``out/train-{000000..000003}.tar``

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(reason.split(":", 1)[0] for reason in self.skipped.values()).most_common())

    def __str__(self) -> str:
        lines = [
            f"wrote {self.images_written:,} images to {len(self.shards)} shard(s), "
            f"{self.bytes_written / 1e6:.1f} MB" + (f": {self.pattern}" if self.pattern else "")
        ]
        if self.class_names is not None:
            lines.append(f"{len(self.class_names)} classes")
        if self.skipped:
            counts = ", ".join(f"{n} {reason}" for reason, n in self.skipped_by_reason().items())
            lines.append(f"skipped {len(self.skipped)} file(s): {counts}")
            lines += [f"  {path}: {reason}" for path, reason in list(self.skipped.items())[:5]]
            if len(self.skipped) > 5:
                lines.append(f"  ... and {len(self.skipped) - 5} more (see summary.json)")
        return "\n".join(lines)


# ---------------------------------------------------------------- finding inputs
def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image(name: str) -> bool:
    return _visible(name) and os.path.splitext(name)[1].lower()[1:] in IMAGE_EXTENSIONS


def _walk_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively, skipping hidden files and folders; sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if _visible(d)]  # prune hidden folders in place
        found += [Path(dirpath, f) for f in filenames if _is_image(f)]
    return sorted(found)


def detect_kind(source: str | os.PathLike) -> str:
    """``list`` for a file; for a folder ``flat`` if images sit at its top level, else ``tree`` if it has
    visible subfolders, else ``flat`` (an empty folder)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_file():
        return "list"
    entries = list(os.scandir(source))
    if any(e.is_file() and _is_image(e.name) for e in entries):
        return "flat"
    return "tree" if any(e.is_dir() and _visible(e.name) for e in entries) else "flat"


def _parse_list_line(line: str) -> tuple[str, int | None]:
    if "\t" in line:  # a TAB always separates the label, so paths may contain spaces
        path, label = line.rsplit("\t", 1)
        return path.strip(), int(label)
    parts = line.rsplit(None, 1)
    if len(parts) == 2 and re.fullmatch(r"[+-]?\d+", parts[1]):
        return parts[0], int(parts[1])
    return line.strip(), None


def _read_list(list_file: Path) -> tuple[list[ImageItem], list[str] | None]:
    root = list_file.resolve().parent
    items = []
    for lineno, raw in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            name, label = _parse_list_line(line)
        except ValueError:
            raise ValueError(f"{list_file}:{lineno}: the label after the TAB must be an integer: {raw!r}") from None
        if label is not None and label < 0:
            raise ValueError(f"{list_file}:{lineno}: negative label {label}")
        path = Path(name).expanduser()
        relpath = path.as_posix() if not path.is_absolute() else _relative_or_absolute(path, root)
        items.append(ImageItem(str(path if path.is_absolute() else root / path), label, relpath))
    labelled = {item.label is not None for item in items}
    if len(labelled) > 1:
        raise ValueError(f"{list_file}: some lines have a label and some do not")
    if labelled != {True}:
        return items, None
    # Lists carry label ids only, so the class "names" are the ids themselves.
    return items, [str(i) for i in range(max(item.label for item in items) + 1)]


def _relative_or_absolute(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def find_images(source: str | os.PathLike, kind: str | None = None) -> tuple[list[ImageItem], list[str] | None]:
    """The images of ``source`` in a stable order, and its class names (None when unlabelled).

    ``kind`` is ``"tree"``, ``"flat"`` or ``"list"``; None detects it with ``detect_kind``. Folder sources
    keep only image extensions (case-insensitive) and skip hidden files and folders; in a tree, images
    directly under the root belong to no class and are ignored. A list keeps every listed path (its
    reader decides later whether it is an image). Raises ValueError for a malformed list.
    """
    source = Path(source)
    kind = kind or detect_kind(source)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "list":
        if not source.is_file():
            raise ValueError(f"kind 'list' needs a text file, {source} is not one")
        return _read_list(source)
    if not source.is_dir():
        raise ValueError(f"kind {kind!r} needs a folder, {source} is not one")
    if kind == "flat":
        return [ImageItem(str(p), None, p.relative_to(source).as_posix()) for p in _walk_images(source)], None
    class_names = sorted(e.name for e in os.scandir(source) if e.is_dir() and _visible(e.name))
    items = [
        ImageItem(str(p), label, p.relative_to(source).as_posix())
        for label, name in enumerate(class_names)
        for p in _walk_images(source / name)
    ]
    return items, class_names


# ---------------------------------------------------------------- decoding / encoding (runs in workers)
def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Alpha is dropped (like ``convert("RGB")`` in the usual ImageNet loader)."""
    if img.mode.startswith("I") or img.mode == "F":
        # PIL clips 16/32-bit values to 255 instead of scaling them: rescale to 8 bits by hand.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":  # float images have no fixed range: stretch to [0, 255]
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
        else:
            arr = arr * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # going straight to RGB warns about palette transparency
    return img if img.mode == "RGB" else img.convert("RGB")


def encode_image(data: bytes, resize_long_side: int | None = None, quality: int = 95) -> tuple[bytes, int, int]:
    """``(jpeg_bytes, width, height)`` for an encoded image; width and height are the original ones.

    A JPEG (recognised by its magic bytes) that needs no downscaling is returned unchanged after a full
    decode proves it intact. Otherwise the image is converted to RGB, downscaled with bicubic so its long
    side is ``resize_long_side`` (only when larger), and encoded as JPEG. Raises what PIL raises.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode everything: catches truncated and corrupt files that only fail mid-stream
        width, height = img.size
        scale = resize_long_side / max(width, height) if resize_long_side else 1.0
        if data.startswith(JPEG_MAGIC) and scale >= 1.0:
            return data, width, height
        rgb = _to_rgb(img)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), width, height


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _load(job: tuple[str, int | None, int]) -> tuple[bytes | None, int, int, str | None]:
    """Worker: ``(jpeg, width, height, None)``, or ``(None, 0, 0, reason)`` for an input to skip."""
    path, resize_long_side, quality = job
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        return None, 0, 0, "missing: file not found"
    except PermissionError as e:
        return None, 0, 0, f"permission denied: {e.strerror}"
    except OSError as e:
        return None, 0, 0, f"unreadable: {e.strerror or e}"
    if not data:
        return None, 0, 0, "empty file: 0 bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/metadata chatter, once per image and per worker
            return (*encode_image(data, resize_long_side, quality), None)
    except UnidentifiedImageError:
        return None, 0, 0, "not an image: PIL cannot identify it"
    except Image.DecompressionBombError as e:
        return None, 0, 0, f"too large: {e}"
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... for bad data
        return None, 0, 0, f"corrupt image: {type(e).__name__}: {e}"


def _ordered_map(jobs: list[tuple], workers: int) -> Iterator[tuple]:
    """``map(_load, jobs)`` in order, over ``workers`` processes when > 1.

    A bounded window of ``apply_async`` calls rather than ``Pool.imap``: imap queues every result it gets
    ahead of a slow consumer, and with a million images that can be gigabytes of encoded JPEGs.
    """
    if workers <= 1:
        yield from map(_load, jobs)
        return
    with multiprocessing.Pool(workers) as pool:
        window: deque = deque()
        todo = iter(jobs)
        for job in todo:
            window.append(pool.apply_async(_load, (job,)))
            if len(window) >= 64 * workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


# ---------------------------------------------------------------- writing
def _key(index: int, width: int, path: str) -> str:
    """Zero-padded running index plus the file stem reduced to ``[A-Za-z0-9_-]``.

    WebDataset splits member names at the first dot of the basename, so keys must have none.
    """
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem).strip("_")[:_MAX_STEM]
    return f"{index:0{width}d}_{stem}" if stem else f"{index:0{width}d}"


def _member_bytes(sample: dict) -> int:
    """Bytes the sample's members take inside a tar: a header block each plus data padded to blocks."""
    return sum(_BLOCK + math.ceil(len(v) / _BLOCK) * _BLOCK for k, v in sample.items() if k != "__key__")


def _archive_bytes(members: int) -> int:
    """Size of a tar file holding ``members`` bytes of members (end blocks, record padding)."""
    return math.ceil((members + 2 * _BLOCK) / _RECORD) * _RECORD


class _Progress:
    """tqdm when installed, else a line every ~5% or 30 s."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        self.last_print = time.monotonic()
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", desc="sharding", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled:
            now = time.monotonic()
            if self.done == self.total or self.done % max(1, self.total // 20) == 0 or now - self.last_print > 30:
                print(f"sharding: {self.done}/{self.total} images", file=sys.stderr, flush=True)
                self.last_print = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _as_item(item: ImageItem | str | os.PathLike) -> ImageItem:
    return item if isinstance(item, ImageItem) else ImageItem(str(item), None, str(item))


def write_shards(
    items: Iterable[ImageItem | str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "train",
    max_count: int = 1000,
    max_bytes: int | None = None,
    seed: int = 0,
    resize_long_side: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 1,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> ShardSummary:
    """Shuffle ``items`` with ``seed`` and write them as ``out_dir/{prefix}-%06d.tar`` shards.

    A shard closes at ``max_count`` samples or before its file would grow past ``max_bytes`` (real file
    size, tar overhead included; a single bigger sample still gets a shard of its own). Same items and
    seed give byte-identical shards whatever ``workers`` is: members carry a fixed mtime and the parent
    writes results in input order. Unreadable inputs are skipped and recorded, never fatal. Also writes
    ``classes.json`` (labelled inputs) and ``summary.json``. Existing ``{prefix}-NNNNNN.tar`` files in
    ``out_dir`` raise FileExistsError unless ``overwrite``, which deletes them first, so no stale shard
    from an earlier, longer run survives. Plain paths are accepted as unlabelled items.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError(f"prefix may only use letters, digits, '_', '.', '-': {prefix!r}")
    if max_count < 1 or (max_bytes is not None and max_bytes < 1):
        raise ValueError("max_count and max_bytes must be positive")
    items = [_as_item(item) for item in items]
    labels = [item.label for item in items if item.label is not None]
    if labels and len(labels) != len(items):
        raise ValueError("either every item has a label or none has")
    if labels and class_names is None:
        class_names = [str(i) for i in range(max(labels) + 1)]
    if class_names is not None:
        class_names = list(class_names)
        bad = [label for label in labels if not 0 <= label < len(class_names)]
        if bad:
            raise ValueError(f"label {bad[0]} is out of range for {len(class_names)} class names")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(p for p in out_dir.iterdir() if re.fullmatch(re.escape(prefix) + _SHARD_RE, p.name))
    if stale and not overwrite:
        raise FileExistsError(f"{out_dir} already has {len(stale)} {prefix}-*.tar shard(s)")
    for path in stale:
        path.unlink()

    random.Random(seed).shuffle(items)
    jobs = [(item.path, resize_long_side, jpeg_quality) for item in items]
    key_width = max(8, len(str(len(items))))
    summary = ShardSummary(class_names=class_names)
    bar = _Progress(len(items), progress)
    # Files are opened here, not by webdataset's gopen, which reads "a:b" as a URL scheme and obeys
    # WDS_SECURE/GOPEN_REWRITE; the `post` hook closes them (TarWriter leaves passed-in files open).
    opened: dict[str, io.BufferedWriter] = {}

    def opener(fname: str) -> io.BufferedWriter:
        opened[fname] = open(fname, "wb")  # noqa: SIM115 -- closed by `post`
        return opened[fname]

    writer = wds.ShardWriter(
        str(out_dir / prefix).replace("%", "%%") + "-%06d.tar",
        maxcount=max_count,
        maxsize=max_bytes or float("inf"),
        opener=opener,
        post=lambda fname: opened.pop(fname).close(),
        verbose=0,
        encoder=False,  # every value below is already bytes
        mtime=0,
    )
    in_shard = 0  # tar bytes of the members in the open shard
    try:
        for index, (item, (jpg, width, height, reason)) in enumerate(
            zip(items, _ordered_map(jobs, workers), strict=True)
        ):
            bar.update()
            if reason is not None:
                summary.skipped[item.path] = reason
                continue
            meta = {
                "path": item.relpath or item.path,
                "width": width,
                "height": height,
                "label": item.label,
                "class_name": None if item.label is None else class_names[item.label],
            }
            sample = {"__key__": _key(index, key_width, item.path), "jpg": jpg}
            if item.label is not None:
                sample["cls"] = str(item.label).encode("ascii")
            sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
            # Rotate ourselves: ShardWriter's maxsize counts payload bytes only, after the fact, so its
            # shards overshoot by a sample plus all tar headers and padding.
            size = _member_bytes(sample)
            full = writer.count >= max_count
            if max_bytes is not None and writer.count and _archive_bytes(in_shard + size) > max_bytes:
                full = True
            if full:
                writer.next_stream()
                in_shard = 0
            writer.write(sample)
            in_shard += size
            if not summary.shards or summary.shards[-1] != writer.fname:
                summary.shards.append(writer.fname)
            summary.images_written += 1
    finally:
        bar.close()
        writer.close()
    if not summary.shards:  # ShardWriter opens its first shard up front, even if nothing comes
        Path(writer.fname).unlink(missing_ok=True)

    summary.bytes_written = sum(os.path.getsize(p) for p in summary.shards)
    if len(summary.shards) > 1:
        summary.pattern = str(out_dir / f"{prefix}-{{{0:06d}..{len(summary.shards) - 1:06d}}}.tar")
    elif summary.shards:
        summary.pattern = summary.shards[0]
    if class_names is not None:
        (out_dir / "classes.json").write_text(json.dumps(class_names, indent=1) + "\n")
    report = asdict(summary)
    report["shards"] = [Path(p).name for p in summary.shards]  # relative, so the folder can move
    report["pattern"] = Path(summary.pattern).name if summary.pattern else ""
    report["skipped_by_reason"] = summary.skipped_by_reason()
    report["settings"] = {
        "prefix": prefix,
        "max_count": max_count,
        "max_bytes": max_bytes,
        "seed": seed,
        "resize_long_side": resize_long_side,
        "jpeg_quality": jpeg_quality,
    }
    (out_dir / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    return summary


# ---------------------------------------------------------------- reading back
def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a folder (its ``*.tar``, sorted), a glob (``out/train-*.tar``, sorted), a brace
    pattern (``out/train-{000000..000003}.tar``, in order) or a list of any of these.

    A brace pattern is expanded without checking the files exist (it may name URLs); a folder or glob
    that matches nothing raises FileNotFoundError.
    """
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [path for one in spec for path in list_shards(one)]
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).glob("*.tar") if _visible(p.name))
    elif any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
    else:
        return list(braceexpand(spec))
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {spec}")
    return paths


_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")


def local_shard_path(url: str) -> str | None:
    """The file a shard URL names on this machine, or None for what only opening can check (``pipe:``
    commands, ``http://``, ``s3://``, ``-`` for stdin, ...). ``file:`` URLs give their path."""
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith("file:"):
        return url[len("file:") :]
    return None if url == "-" or _REMOTE.match(url) else url


def missing_shards(urls: Sequence[str], threads: int = 16) -> list[str]:
    """The local shards of ``urls`` that are not files (missing, or a folder), in order, each once.

    One ``stat`` per distinct local path (in threads for long lists on network file systems); remote
    URLs are not checked."""
    paths = {url: local_shard_path(url) for url in dict.fromkeys(urls)}
    local = [url for url, path in paths.items() if path is not None]

    def absent(url: str) -> bool:
        try:
            return not stat.S_ISREG(os.stat(paths[url]).st_mode)
        except OSError:
            return True

    if len(local) > 256:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            flags = list(pool.map(absent, local))
    else:
        flags = [absent(url) for url in local]
    return [url for url, gone in zip(local, flags, strict=True) if gone]

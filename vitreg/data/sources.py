"""Image sources: what a user's string (or list of shards) names, detected once, for every reader of images.

``image_source`` tells apart, in this order:

* ``"synthetic"``: ``SyntheticShapes`` (its reader builds it from its own options);
* WebDataset shards: a list of them, a URL (``pipe:``, ``http://``, ``file:``, ...), a brace pattern
  ``shards/val-{000000..000003}.tar`` or a glob, a ``.tar`` file, or a folder holding ``.tar`` files
  (shards in order; a ``classes.json`` next to the first local shard names the classes);
* image files: one image file, a class-folder tree ``root/<class>/<image>`` (labels: the sorted class
  folders), a flat folder of images (unlabelled) or a list file of ``path`` or ``path<TAB>label`` lines
  (``find_images``).

Evaluation (``vitreg.eval.data.LabelledImages``) asks for a ``labelled`` source and gets a ``ValueError``
naming the fix for an unlabelled one; the probe images (``vitreg.data.probe``) take any.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vitreg.data.decode import IMAGE_EXTENSIONS
from vitreg.data.shards import ImageItem, detect_kind, find_images, list_shards, local_shard_path
from vitreg.data.tar import SkipCounter, iter_tar_samples

SYNTHETIC = "synthetic"
SOURCE_HELP = (
    "pass a class-folder tree (root/<class>/<image>), a list file (path<TAB>label lines), labelled WebDataset "
    "shards (a .tar, a folder of .tar files or a brace pattern such as shards/val-{000000..000009}.tar) or "
    "'synthetic'"
)


@dataclass(frozen=True)
class ImageSource:
    """A detected source: ``kind`` is ``"synthetic"``, ``"shards"`` (``shards``: their URLs in order) or
    ``"files"`` (``items``: the images in a stable order). ``class_names`` is None when unknown or
    unlabelled; ``spec`` is what the user gave, for messages."""

    spec: str
    kind: str
    shards: tuple[str, ...] = ()
    items: tuple[ImageItem, ...] = ()
    class_names: tuple[str, ...] | None = None


def _visible_tar(path: Path) -> bool:
    return path.suffix == ".tar" and not path.name.startswith(".")


def _shard_source(spec: str | Sequence[str], shards: list[str]) -> ImageSource:
    first = local_shard_path(shards[0]) if shards else None
    classes = Path(first).parent / "classes.json" if first is not None else None
    names = tuple(str(c) for c in json.loads(classes.read_text())) if classes and classes.is_file() else None
    return ImageSource(str(spec), "shards", shards=tuple(shards), class_names=names)


def _file_source(path: Path, labelled: bool) -> ImageSource:
    if path.is_file() and path.suffix.lower()[1:] in IMAGE_EXTENSIONS:
        items, class_names = [ImageItem(str(path), None, path.name)], None
    else:
        kind = detect_kind(path)
        if kind == "flat" and labelled:
            raise ValueError(
                f"{path} holds images without class folders, but evaluation needs labels: put them in "
                f"{path}/<class>/<image> folders or list them with labels (path<TAB>label); {SOURCE_HELP}"
            )
        items, class_names = find_images(path, kind)
    if not items:
        raise ValueError(f"no images in {path} (extensions {', '.join(IMAGE_EXTENSIONS)}); {SOURCE_HELP}")
    if labelled and class_names is None:
        raise ValueError(f"{path} lists images without labels; evaluation needs 'path<TAB>label' lines")
    names = tuple(class_names) if class_names is not None else None
    return ImageSource(str(path), "files", items=tuple(items), class_names=names)


def image_source(spec: str | os.PathLike | Sequence[str], *, labelled: bool = False) -> ImageSource:
    """The source ``spec`` names (see the module docstring). Raises ``ValueError`` saying what to pass
    for a path that does not exist, a pattern that matches nothing, a folder without images, or (with
    ``labelled``) images without labels. Shards named by a brace pattern are not checked to exist."""
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return _shard_source(spec, list_shards(list(spec)))
    spec = os.fspath(spec)
    if spec == SYNTHETIC:
        return ImageSource(spec, SYNTHETIC)
    remote = local_shard_path(spec) != spec  # a URL, file: included
    if remote or (any(c in spec for c in "{*?[") and not os.path.exists(spec)):
        try:
            return _shard_source(spec, list_shards(spec))
        except FileNotFoundError:
            raise ValueError(f"no shards match {spec!r}; {SOURCE_HELP}") from None
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"image source {spec} does not exist; {SOURCE_HELP}")
    if path.is_file() and path.name.endswith(".tar"):
        return _shard_source(spec, [str(path)])
    if path.is_dir() and any(_visible_tar(p) for p in path.iterdir()):
        return _shard_source(spec, list_shards(path))
    return _file_source(path, labelled)


def encoded_images(source: ImageSource, skips: SkipCounter) -> Iterator[tuple[str, bytes]]:
    """``(name, encoded bytes)`` of every image of a file or shard source, in source order. Unreadable
    files and shards and samples without an image member are skipped (and counted in ``skips``)."""
    if source.kind == "files":
        for item in source.items:
            try:
                yield item.path, Path(item.path).read_bytes()
            except OSError as err:
                skips.skip("unreadable", source.spec, f"{item.path}: {err}")
        return
    if source.kind != "shards":
        raise ValueError(f"a {source.kind} source has no encoded images")
    for shard in source.shards:
        for sample in iter_tar_samples(shard, skips):
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is not None:
                yield f"{shard}:{sample['__key__']}", sample[ext]

"""The embedded synthetic dataset written once as WebDataset shards, so the demo trains through the
same streaming, decoding and bad-data path as real data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

from vitreg.data.synthetic import SyntheticShapes

FORMAT_VERSION = 1  # bump when the rendering or the shard layout changes: a new cache folder follows


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))  # mtime 0: identical bytes on every machine


def ensure_synthetic_shards(
    cache_root: str | os.PathLike,
    *,
    num_images: int,
    image_size: int,
    num_classes: int,
    seed: int,
    class_appearance: bool = True,
    per_shard: int = 512,
    quality: int = 95,
) -> list[str]:
    """Shard paths of the training split; rendered on first use into a folder named by the
    parameters (later runs reuse it). Written to a temporary folder and renamed, so an
    interrupted first run never leaves a half-written cache."""
    params = dict(
        num_images=num_images,
        image_size=image_size,
        num_classes=num_classes,
        seed=seed,
        class_appearance=class_appearance,
        per_shard=per_shard,
        quality=quality,
        v=FORMAT_VERSION,
    )
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_root) / f"synthetic-{digest}"
    if not (folder / "params.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            images = SyntheticShapes(
                num_images, image_size, num_classes, seed, "train", class_appearance=class_appearance
            )
            for start in range(0, num_images, per_shard):
                with tarfile.open(tmp / f"train-{start // per_shard:06d}.tar", "w") as tar:
                    for index in range(start, min(start + per_shard, num_images)):
                        img, label = images.render(index)
                        buf = io.BytesIO()
                        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
                        _add(tar, f"{index:08d}.jpg", buf.getvalue())
                        _add(tar, f"{index:08d}.cls", str(label).encode())
            (tmp / "classes.json").write_text(json.dumps(images.class_names))
            (tmp / "params.json").write_text(json.dumps(params, indent=2))
            try:
                tmp.rename(folder)
            except OSError:  # another process finished first: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return sorted(str(p) for p in folder.glob("train-*.tar"))

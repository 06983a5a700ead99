"""Packing image folders and lists into WebDataset shards, and reading them back with plain webdataset."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vitreg.data import shards
from vitreg.data.shards import ImageItem, detect_kind, encode_image, find_images, list_shards, write_shards

JPEG_MAGIC = b"\xff\xd8\xff"


def _noise(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def save_image(path: Path, kind: str = "jpeg", size: tuple[int, int] = (24, 16), seed: int = 0) -> Path:
    """A small image of a given flavour: jpeg, gray_jpeg, png, rgba, palette, png16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_noise(size, seed))
    if kind == "jpeg":
        rgb.save(path, format="JPEG", quality=90)
    elif kind == "gray_jpeg":
        rgb.convert("L").save(path, format="JPEG")
    elif kind == "png":
        rgb.save(path, format="PNG")
    elif kind == "rgba":
        rgb.convert("RGBA").save(path, format="PNG")
    elif kind == "palette":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.save(path, format="PNG", transparency=0)
    elif kind == "png16":  # 16-bit grayscale, mid-range values: must not saturate to white
        Image.fromarray(np.full((size[1], size[0]), 30000, dtype=np.uint16)).save(path, format="PNG")
    else:
        raise ValueError(kind)
    return path


def make_tree(root: Path) -> dict[str, Path]:
    """3 classes, 11 good images of mixed formats, hidden/non-image files; returns relpath -> file."""
    flavours = {
        "cat": ["jpeg", "png", "rgba", "jpeg"],
        "dog": ["palette", "png16", "jpeg"],
        "zebra": ["gray_jpeg", "jpeg", "png", "jpeg"],
    }
    files = {}
    for c, (name, kinds) in enumerate(flavours.items()):
        for i, kind in enumerate(kinds):
            ext = ".jpg" if "jpeg" in kind else ".png"
            rel = f"{name}/{name}_{i}{ext}" if i < 3 else f"{name}/sub/{name}_{i}.JPEG"  # nested + upper case
            files[rel] = save_image(root / rel, kind, seed=10 * c + i)
    (root / "cat" / "notes.txt").write_text("not an image")
    save_image(root / "cat" / ".hidden.jpg")
    save_image(root / ".cache" / "x.jpg")
    return files


def make_broken(folder: Path) -> dict[str, str]:
    """Broken inputs and the reason category each must be skipped with."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(_noise((64, 64), 99)).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "text.png").write_text("this is not a PNG\n" * 10)
    return {"empty.jpg": "empty file", "truncated.jpg": "corrupt image", "text.png": "not an image"}


def read_members(paths: list[str]) -> list[tuple[str, bytes]]:
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out


def read_samples(paths: list[str]) -> list[dict]:
    return list(wds.WebDataset(paths, shardshuffle=False))


def write(items, out, **kw):
    kw.setdefault("progress", False)
    return write_shards(items, out, **kw)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tree")
    return root, make_tree(root)


# ---------------------------------------------------------------- finding images
def test_tree_is_detected_with_sorted_classes(tree):
    root, files = tree
    assert detect_kind(root) == "tree"
    items, classes = find_images(root)
    assert classes == ["cat", "dog", "zebra"]
    assert sorted(item.relpath for item in items) == sorted(files)  # no hidden, no .txt; nested + .JPEG kept
    assert all(item.label == classes.index(item.relpath.split("/")[0]) for item in items)
    assert find_images(root) == (items, classes)  # stable order


def test_flat_folder_recurses_without_labels(tmp_path, tree):
    save_image(tmp_path / "a.png", "png")
    save_image(tmp_path / "deep" / "er" / "b.jpeg", "jpeg")
    save_image(tmp_path / ".hidden" / "c.jpg")
    (tmp_path / "readme.md").write_text("hi")
    assert detect_kind(tmp_path) == "flat"
    items, classes = find_images(tmp_path)
    assert classes is None and [i.relpath for i in items] == ["a.png", "deep/er/b.jpeg"]
    assert all(i.label is None for i in items)
    forced, none = find_images(tree[0], kind="flat")  # a tree read as flat: same files, no labels
    assert none is None and len(forced) == len(tree[1]) and all(i.label is None for i in forced)


def test_list_file_with_labels_and_relative_paths(tmp_path):
    save_image(tmp_path / "imgs" / "a.jpg")
    save_image(tmp_path / "imgs" / "with space.png", "png")
    outside = save_image(tmp_path.parent / f"{tmp_path.name}_outside.jpg")
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(f"# comment\n../imgs/a.jpg\t2\n\n../imgs/with space.png 0\n{outside} 1\n")
    assert detect_kind(lst) == "list"
    items, classes = find_images(lst)
    assert [i.label for i in items] == [2, 0, 1] and classes == ["0", "1", "2"]
    assert Path(items[0].path).resolve() == (tmp_path / "imgs" / "a.jpg").resolve()
    assert items[1].relpath == "../imgs/with space.png" and items[2].relpath == str(outside)

    lst.write_text("../imgs/a.jpg\n../imgs/with space.png\n")
    items, classes = find_images(lst)
    assert classes is None and [i.label for i in items] == [None, None]
    lst.write_text("../imgs/a.jpg\t1\n../imgs/with space.png\n")
    with pytest.raises(ValueError, match="some lines have a label"):
        find_images(lst)
    lst.write_text("../imgs/a.jpg\tcat\n")
    with pytest.raises(ValueError, match="must be an integer"):
        find_images(lst)


def test_kind_mismatch_and_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="needs a text file"):
        find_images(tmp_path, kind="list")
    with pytest.raises(ValueError, match="kind must be one of"):
        find_images(tmp_path, kind="imagenet")
    assert find_images(tmp_path) == ([], None)  # empty folder: flat, nothing in it


# ---------------------------------------------------------------- encoding
def test_encode_keeps_jpeg_and_reencodes_the_rest(tmp_path):
    jpg = save_image(tmp_path / "a.jpg", "jpeg", size=(40, 30)).read_bytes()
    assert encode_image(jpg) == (jpg, 40, 30)
    assert encode_image(jpg, resize_long_side=40)[0] == jpg  # not larger: untouched
    small, w, h = encode_image(jpg, resize_long_side=20)
    assert (w, h) == (40, 30) and Image.open(io.BytesIO(small)).size == (20, 15)
    # a PNG named .jpg is found by its bytes, not its name
    png = save_image(tmp_path / "fake.jpg", "png").read_bytes()
    out, *_ = encode_image(png)
    assert out.startswith(JPEG_MAGIC) and Image.open(io.BytesIO(out)).mode == "RGB"
    for kind in ("rgba", "palette", "png16"):
        out, *_ = encode_image(save_image(tmp_path / f"{kind}.png", kind).read_bytes())
        assert Image.open(io.BytesIO(out)).mode == "RGB"
    pixels = np.asarray(Image.open(io.BytesIO(encode_image((tmp_path / "png16.png").read_bytes())[0])))
    assert abs(pixels.mean() - 30000 / 65535 * 255) < 3  # scaled, not clipped to 255
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(cmyk, format="JPEG")
    assert encode_image(cmyk.getvalue())[0] == cmyk.getvalue()  # any JPEG stays as-is


# ---------------------------------------------------------------- writing and reading back
def test_tree_round_trip(tmp_path, tree):
    root, files = tree
    items, classes = find_images(root)
    summary = write(items, tmp_path / "out", class_names=classes, max_count=4)
    assert summary.images_written == 11 and not summary.skipped and len(summary.shards) == 3
    assert summary.class_names == classes
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == classes
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert report["images_written"] == 11 and report["pattern"] == "train-{000000..000002}.tar"
    assert list_shards(summary.pattern) == summary.shards

    samples = read_samples(summary.shards)
    assert len(samples) == 11 and len({s["__key__"] for s in samples}) == 11
    for s in samples:
        assert {"__key__", "__url__", "jpg", "cls", "json"} <= set(s)
        assert "." not in s["__key__"] and len(s["__key__"]) < 90
        meta = json.loads(s["json"])
        original = files[meta["path"]].read_bytes()
        assert int(s["cls"]) == meta["label"] and meta["class_name"] == meta["path"].split("/")[0]
        assert (meta["width"], meta["height"]) == (24, 16)
        if original.startswith(JPEG_MAGIC):
            assert s["jpg"] == original  # byte for byte
        else:
            assert s["jpg"].startswith(JPEG_MAGIC) and Image.open(io.BytesIO(s["jpg"])).mode == "RGB"


def test_resize_downscales_big_images_only(tmp_path):
    big = save_image(tmp_path / "src" / "big.jpg", size=(300, 200))
    small = save_image(tmp_path / "src" / "small.jpg", size=(50, 40), seed=1)
    summary = write([big, small], tmp_path / "out", resize_long_side=64, jpeg_quality=80)
    by_name = {json.loads(s["json"])["path"]: s for s in read_samples(summary.shards)}
    meta = json.loads(by_name[str(big)]["json"])
    assert (meta["width"], meta["height"], meta["label"]) == (300, 200, None)
    assert Image.open(io.BytesIO(by_name[str(big)]["jpg"])).size == (64, 43)  # aspect kept
    assert by_name[str(small)]["jpg"] == small.read_bytes()
    assert "cls" not in by_name[str(big)] and not (tmp_path / "out" / "classes.json").exists()


def test_same_seed_same_bytes_across_workers(tmp_path, tree):
    items, classes = find_images(tree[0])
    one = write(items, tmp_path / "w1", class_names=classes, max_count=5, seed=3, workers=1)
    two = write(items, tmp_path / "w2", class_names=classes, max_count=5, seed=3, workers=2)
    assert [Path(p).name for p in one.shards] == [Path(p).name for p in two.shards]
    assert all(Path(a).read_bytes() == Path(b).read_bytes() for a, b in zip(one.shards, two.shards, strict=True))
    other = write(items, tmp_path / "w3", class_names=classes, max_count=5, seed=4)
    names = [name for name, _ in read_members(one.shards)]
    assert names != [name for name, _ in read_members(other.shards)]
    assert sorted(json.loads(d)["path"] for n, d in read_members(other.shards) if n.endswith(".json")) == sorted(
        json.loads(d)["path"] for n, d in read_members(one.shards) if n.endswith(".json")
    )


def test_max_count_and_max_bytes_split_shards(tmp_path):
    paths = [save_image(tmp_path / "src" / f"{i}.jpg", size=(64, 64), seed=i) for i in range(10)]
    by_count = write(paths, tmp_path / "count", max_count=3)
    assert [len(read_samples([p])) for p in by_count.shards] == [3, 3, 3, 1]

    limit = 3 * 10240
    by_bytes = write(paths, tmp_path / "bytes", max_bytes=limit)
    sizes = [os.path.getsize(p) for p in by_bytes.shards]
    assert len(sizes) > 2 and max(sizes) <= limit and sum(sizes) == by_bytes.bytes_written
    assert sum(len(read_samples([p])) for p in by_bytes.shards) == 10
    one_each = write(paths[:2], tmp_path / "tiny", max_bytes=1)  # a sample bigger than the limit: own shard
    assert len(one_each.shards) == 2


def test_broken_files_are_skipped_and_reported(tmp_path):
    expected = make_broken(tmp_path / "src")
    save_image(tmp_path / "src" / "good.png", "png")
    items, _ = find_images(tmp_path / "src")
    missing = ImageItem(str(tmp_path / "src" / "gone.jpg"), None, "gone.jpg")
    summary = write([*items, missing], tmp_path / "out", workers=2)
    assert summary.images_written == 1
    reasons = {Path(path).name: reason.split(":")[0] for path, reason in summary.skipped.items()}
    assert reasons == {**expected, "gone.jpg": "missing"}
    text = str(summary)
    assert "wrote 1 images to 1 shard(s)" in text and "skipped 4 file(s)" in text and "1 empty file" in text
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert report["skipped_by_reason"]["corrupt image"] == 1 and len(report["skipped"]) == 4


def test_permission_denied_reason(tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(shards, "_read_bytes", denied)  # workers=1 reads in this process
    summary = write([save_image(tmp_path / "a.jpg")], tmp_path / "out")
    assert summary.images_written == 0 and next(iter(summary.skipped.values())).startswith("permission denied")
    assert summary.shards == [] and not list((tmp_path / "out").glob("*.tar"))  # no empty shard left behind


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_file_is_skipped(tmp_path):
    locked = save_image(tmp_path / "src" / "locked.jpg")
    save_image(tmp_path / "src" / "ok.jpg", seed=1)
    locked.chmod(0)
    try:
        summary = write(find_images(tmp_path / "src")[0], tmp_path / "out")
    finally:
        locked.chmod(0o644)
    assert summary.images_written == 1 and summary.skipped[str(locked)].startswith("permission denied")


def test_progress_without_tqdm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `from tqdm import tqdm` raise ImportError
    write_shards([save_image(tmp_path / f"{i}.jpg", seed=i) for i in range(3)], tmp_path / "out")
    assert "sharding: 3/3 images" in capsys.readouterr().err


def test_existing_shards_need_overwrite(tmp_path):
    paths = [save_image(tmp_path / "src" / f"{i}.jpg", seed=i) for i in range(4)]
    write(paths, tmp_path / "out", max_count=1)
    with pytest.raises(FileExistsError):
        write(paths, tmp_path / "out")
    summary = write(paths, tmp_path / "out", overwrite=True)
    assert list_shards(tmp_path / "out") == summary.shards  # the 3 stale shards are gone
    write(paths, tmp_path / "out", prefix="val")  # another prefix coexists
    assert len(list_shards(tmp_path / "out")) == 2 and len(list_shards(str(tmp_path / "out" / "val-*.tar"))) == 1


def test_keys_are_safe(tmp_path):
    odd = save_image(tmp_path / "src" / ("a.b c#é" + "x" * 200 + ".png"), "png")
    summary = write([odd], tmp_path / "out")
    (name, _), *_ = read_members(summary.shards)
    assert name.count(".") == 1 and name.startswith("00000000_a_b_c_") and len(name) <= 80


# ---------------------------------------------------------------- list_shards
def test_list_shards_patterns_and_img2dataset_layout(tmp_path):
    assert list_shards("s/train-{000000..000002}.tar") == [f"s/train-{i:06d}.tar" for i in range(3)]
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path)
    # img2dataset writes jpg + json + txt (a caption) and no cls: listing and reading must still work.
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"{shard:05d}.tar"), encoder=False) as tar:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                jpg = io.BytesIO()
                Image.fromarray(_noise((8, 8), i)).save(jpg, format="JPEG")
                meta = {"url": f"http://x/{key}.jpg", "caption": f"photo {key}", "key": key, "status": "success"}
                tar.write({"__key__": key, "jpg": jpg.getvalue(), "json": json.dumps(meta).encode(), "txt": b"a cat"})
    (tmp_path / ".partial.tar").write_bytes(b"")
    paths = list_shards(tmp_path)
    assert [Path(p).name for p in paths] == ["00000.tar", "00001.tar"]
    assert paths == list_shards(str(tmp_path / "{00000..00001}.tar")) == list_shards([str(tmp_path)])
    samples = read_samples(paths)
    assert len(samples) == 6 and all({"jpg", "json", "txt"} <= set(s) and "cls" not in s for s in samples)

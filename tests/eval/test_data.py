"""Evaluation data: every labelled source, skips, and the rank split."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitreg.data.shards import ImageItem, write_shards
from vitreg.data.transforms import eval_transform, train_transform
from vitreg.eval.data import LabelledImages, collate_labelled, eval_loader


def image_bytes(value: int, size=(20, 16), fmt: str = "PNG") -> bytes:
    """A constant-colour image whose red channel is ``value`` (PNG: lossless, so the label is recoverable)."""
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 7, 200)).save(buf, format=fmt)
    return buf.getvalue()


def red(image: torch.Tensor) -> int:
    """The red value of a constant image back from raw uint8 samples (transform=None)."""
    return int(image[0, 0, 0])


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def read_all(dataset) -> list[tuple[int, int, int]]:
    """(index, label, red value) of everything a dataset yields (transform None: raw uint8)."""
    return [(index, label, red(image)) for image, label, index in dataset]


# ---------------------------------------------------------------- file sources
@pytest.fixture
def tree(tmp_path) -> Path:
    """root/cat: reds 10, 20; root/dog: reds 30, 40 plus a corrupt file; an empty hidden folder."""
    root = tmp_path / "tree"
    for name, values in (("cat", (10, 20)), ("dog", (30, 40))):
        (root / name).mkdir(parents=True)
        for v in values:
            (root / name / f"{v}.png").write_bytes(image_bytes(v))
    (root / "dog" / "35.png").write_bytes(b"not an image at all")
    (root / ".hidden").mkdir()
    return root


def test_class_folder_tree(tree):
    data = LabelledImages(tree, None)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    # sorted paths: cat/10, cat/20, dog/30, dog/35 (corrupt), dog/40
    assert read_all(data) == [(0, 0, 10), (1, 0, 20), (2, 1, 30), (4, 1, 40)]
    assert data.skipped["not_an_image"] == 1 and sum(data.skipped.values()) == 1
    assert data.num_samples == 5 and len(data) == 5


def test_list_file_with_labels(tree):
    listing = tree.parent / "val.txt"
    listing.write_text(f"# comment\ntree/dog/40.png\t3\n{tree}/cat/10.png\t0\ntree/missing.png\t1\n")
    data = LabelledImages(listing, None)
    assert data.num_classes == 4  # labels 0..3
    assert read_all(data) == [(0, 3, 40), (1, 0, 10)]
    assert data.skipped["unreadable"] == 1


def test_limit_keeps_the_first_samples(tree):
    assert [i for _, _, i in LabelledImages(tree, None, limit=2)] == [0, 1]


def make_bad_source(kind: str, root: Path):
    if kind == "missing":
        return root / "nowhere"
    if kind == "flat":  # images without class folders
        (root / "flat").mkdir()
        (root / "flat" / "a.png").write_bytes(image_bytes(1))
        return root / "flat"
    if kind == "empty":  # a class folder without images
        (root / "empty" / "cls").mkdir(parents=True)
        return root / "empty"
    if kind == "unlabelled_list":
        (root / "list.txt").write_text("a.png\nb.png\n")
        return root / "list.txt"
    return str(root / "s-{000000..000001}.tar")  # shards that do not exist


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("flat", "evaluation needs labels"),
        ("empty", "no images"),
        ("unlabelled_list", "without labels"),
        ("no_shards", "do not exist"),
    ],
)
def test_bad_sources_are_explained(tmp_path, kind, message):
    with pytest.raises(ValueError, match=message) as err:
        LabelledImages(make_bad_source(kind, tmp_path), None)
    assert str(tmp_path) in str(err.value)  # names the path


# ---------------------------------------------------------------- shards
@pytest.fixture
def shards(tmp_path) -> Path:
    """Shard 0 by write_shards (6 good PNG->JPEG images, classes.json); shard 1 by hand: a corrupt image, a
    sample without an image, a good PNG, a truncated PNG."""
    src = tmp_path / "src"
    src.mkdir()
    items = []
    for i in range(6):
        path = src / f"{i}.png"
        path.write_bytes(image_bytes(50 + 10 * i))
        items.append(ImageItem(str(path), label=i % 3))
    out = tmp_path / "shards"
    write_shards(items, out, prefix="val", max_count=100, seed=0, progress=False, class_names=["a", "b", "c"])
    good = image_bytes(200)
    write_tar(
        out / "val-000001.tar",
        [
            {"jpg": b"\xff\xd8\xff garbage \xff\xd9", "cls": b"1"},  # complete, but not a JPEG
            {"json": b"{}", "cls": b"2"},
            {"png": good, "cls": b"0"},
            {"png": good[: len(good) // 2], "cls": b"1"},
        ],
    )
    return out


def shard0_order(shards: Path) -> list[tuple[int, int]]:
    """(label, red) of shard 0's samples in tar order (write_shards shuffled them)."""
    with tarfile.open(shards / "val-000000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return [(m["label"], 50 + 10 * int(Path(m["path"]).stem)) for m in metas]


@pytest.mark.parametrize("form", ["pattern", "folder"])
def test_shards_with_corrupt_samples_skipped_and_counted(shards, form):
    source = shards / "val-{000000..000001}.tar" if form == "pattern" else shards
    data = LabelledImages(source, None)
    assert data.num_classes == 3 and data.class_names == ["a", "b", "c"]  # classes.json
    got = read_all(data)
    first = [(i, label, value) for i, (label, value) in enumerate(shard0_order(shards))]
    assert [(i, label) for i, label, _ in got] == [(i, label) for i, label, _ in first] + [(8, 0)]
    assert all(abs(v - w) <= 3 for (_, _, v), (_, _, w) in zip(got, first, strict=False))  # JPEG re-encoding
    assert got[-1][2] == 200
    skipped = {k: v for k, v in data.skipped.items() if v}
    assert skipped == {"corrupt": 1, "no_image": 1, "truncated": 1}


def test_a_single_tar_and_labels_without_classes_json(shards):
    (shards / "classes.json").unlink()
    data = LabelledImages(shards / "val-000001.tar", None)
    assert data.class_names is None and data.num_classes == 3  # max label 2 + 1, from a scan
    assert read_all(data) == [(2, 0, 200)]
    with pytest.raises(TypeError):
        len(data)  # shards have no length before they are read


def test_unlabelled_shards_are_refused(tmp_path):
    path = write_tar(tmp_path / "u.tar", [{"png": image_bytes(1)}, {"png": image_bytes(2)}])
    with pytest.raises(ValueError, match=r"u\.tar.*no 'cls' label"):
        LabelledImages(path, None)


def test_a_truncated_shard_keeps_what_it_read(shards):
    path = shards / "val-000001.tar"
    with tarfile.open(path) as tar:
        good_png = tar.getmember("000002.png")
    cut = shards / "cut" / "cut.tar"
    cut.parent.mkdir()
    cut.write_bytes(path.read_bytes()[: good_png.offset_data + 10])  # ends inside sample 2's image
    data = LabelledImages(cut, None)
    assert read_all(data) == []  # samples 0 and 1 are bad; sample 2 is cut off
    assert {k: v for k, v in data.skipped.items() if v} == {"corrupt": 1, "no_image": 1, "shard_truncated": 1}


# ---------------------------------------------------------------- synthetic
def test_synthetic_splits_are_deterministic_and_disjoint():
    options = {"num_images": 12, "image_size": 32, "num_classes": 4}
    train = [x for x, _, _ in LabelledImages("synthetic", None, synthetic=options, split="train")]
    again = [x for x, _, _ in LabelledImages("synthetic", None, synthetic=options, split="train")]
    val = [x for x, _, _ in LabelledImages("synthetic", None, synthetic=options, split="val")]
    assert all(torch.equal(a, b) for a, b in zip(train, again, strict=True))
    assert not any(torch.equal(a, b) for a in train for b in val)
    data = LabelledImages("synthetic", None, synthetic=options)
    assert data.num_classes == 4 and [label for _, label, _ in data] == [i % 4 for i in range(12)]
    with pytest.raises(ValueError, match="unknown synthetic option"):
        LabelledImages("synthetic", None, synthetic={"num_imgs": 3})


# ---------------------------------------------------------------- the rank split
def rank_indices(source, world: int, workers: int, **kwargs) -> list[list[int]]:
    out = []
    for rank in range(world):
        data = LabelledImages(source, None, rank=rank, world=world, **kwargs)
        loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=workers, collate_fn=list)
        out.append([index for batch in loader for _, _, index in batch])
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_is_read_exactly_once(world, workers):
    options = {"num_images": 10, "image_size": 16, "num_classes": 3}
    per_rank = rank_indices("synthetic", world, workers, synthetic=options)
    for rank, indices in enumerate(per_rank):
        assert sorted(indices) == list(range(rank, 10, world))  # sample i on rank i % world only
    assert sorted(i for indices in per_rank for i in indices) == list(range(10))


def test_shards_are_split_by_sample_across_ranks_and_workers(shards):
    per_rank = rank_indices(shards, 3, 2)
    for rank, indices in enumerate(per_rank):
        assert sorted(indices) == [i for i in (0, 1, 2, 3, 4, 5, 8) if i % 3 == rank]


def test_shuffle_changes_the_order_not_the_samples():
    options = {"num_images": 20, "image_size": 16, "num_classes": 3}
    data = LabelledImages("synthetic", None, synthetic=options, rank=1, world=2, shuffle=True, seed=3)
    first = [i for _, _, i in data]
    assert sorted(first) == list(range(1, 20, 2)) and first != sorted(first)
    assert [i for _, _, i in data] == first  # same epoch, same order
    data.set_epoch(1)
    assert [i for _, _, i in data] != first


def test_augmentations_do_not_depend_on_the_split():
    options = {"num_images": 6, "image_size": 32, "num_classes": 3}
    one = {i: x for x, _, i in LabelledImages("synthetic", train_transform(16), synthetic=options)}
    two = {i: x for x, _, i in LabelledImages("synthetic", train_transform(16), synthetic=options, rank=1, world=2)}
    assert all(torch.equal(one[i], x) for i, x in two.items())
    assert not torch.equal(one[0], one[3])  # different samples, different crops (same class, other image)


def test_eval_loader_batches():
    loader = eval_loader(
        "synthetic", eval_transform(16), batch_size=4, synthetic={"num_images": 6, "image_size": 32, "num_classes": 3}
    )
    batches = list(loader)
    images, labels, indices = batches[0]
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.long and indices.tolist() == [0, 1, 2, 3]
    assert [len(b[0]) for b in batches] == [4, 2]  # nothing dropped
    assert collate_labelled([(torch.zeros(3, 2, 2), 1, 5)])[2].tolist() == [5]


def test_loader_workers_report_their_skips(shards):
    loader = eval_loader(shards, eval_transform(16), batch_size=2, num_workers=2)
    indices = sorted(i for _, _, batch_indices in loader for i in batch_indices.tolist())
    assert indices == [0, 1, 2, 3, 4, 5, 8]
    # counted in the workers, visible here: the table lives in shared memory
    assert {k: v for k, v in loader.dataset.skipped.items() if v} == {"corrupt": 1, "no_image": 1, "truncated": 1}

"""Image sources are detected once from the user's string, and probe images read any of them the same way."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_class_folders
from vitreg.data.probe import image_probe, load_probe, probe_tensor, save_probe
from vitreg.data.shards import find_images, write_shards
from vitreg.data.sources import encoded_images, image_source
from vitreg.data.tar import SkipCounter
from vitreg.data.transforms import ResizeNormalize, center_square


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("src"), 6, image_size=40, num_classes=2, seed=3)


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory):
    items, classes = find_images(tree)
    out = tmp_path_factory.mktemp("shards")
    write_shards(items, out, max_count=4, class_names=classes, progress=False)
    return out


def test_each_kind_of_string_is_detected(tree, shards, tmp_path):
    assert image_source("synthetic").kind == "synthetic"
    folder = image_source(tree, labelled=True)
    assert (folder.kind, len(folder.items), folder.class_names) == ("files", 6, ("circle", "square"))
    one = image_source(folder.items[0].path)
    assert (one.kind, [i.path for i in one.items], one.class_names) == ("files", [folder.items[0].path], None)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{item.path}\t{item.label}\n" for item in folder.items))
    pairs = [(item.path, item.label) for item in folder.items]
    assert [(item.path, item.label) for item in image_source(listed, labelled=True).items] == pairs
    paths = sorted(str(p) for p in shards.glob("*.tar"))
    for spec in (shards, paths[0], str(shards / "train-{000000..000001}.tar"), str(shards / "*.tar"), paths):
        source = image_source(spec)
        assert source.kind == "shards" and source.class_names == ("circle", "square")
    assert image_source(shards).shards == tuple(paths)


@pytest.mark.parametrize(("make", "message"), [("missing", "does not exist"), ("flat", "evaluation needs labels")])
def test_a_labelled_source_explains_what_is_wrong(tree, tmp_path, make, message):
    spec = tmp_path / "nowhere"
    if make == "flat":
        spec = tmp_path / "flat"
        spec.mkdir()
        (spec / "a.jpg").write_bytes((tree / "circle" / "0.jpg").read_bytes())
        assert image_source(spec).kind == "files"  # fine without labels
    with pytest.raises(ValueError, match=message):
        image_source(spec, labelled=True)


def test_probe_images_are_the_same_from_a_folder_and_from_its_shards(tree, shards, tmp_path):
    from_folder = image_probe(tree, 3, size=16)
    skips = SkipCounter()
    names = [name for name, _ in encoded_images(image_source(shards), skips)]
    assert len(names) == 6 and not skips.counts
    from_shards = image_probe(shards, 6, size=16)  # shards hold the images in a shuffled order
    assert from_folder.dtype == torch.uint8 and from_folder.shape == (3, 3, 16, 16)
    rows = {bytes(img.numpy()) for img in from_shards}
    assert all(bytes(img.numpy()) in rows for img in from_folder)
    save_probe(from_folder, tmp_path / "probe.npz")
    assert torch.equal(load_probe(tmp_path / "probe.npz"), from_folder)


def test_probe_tensor_resizes_and_normalises_each_image():
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    got = probe_tensor(images, 14)
    assert torch.equal(got, torch.stack([ResizeNormalize(14)(img) for img in images]))
    assert center_square(torch.zeros(3, 10, 30, dtype=torch.uint8), 8).shape == (3, 8, 8)

"""Streaming shards: ranks and workers see different data, a seed reproduces the stream, and bad
data (corrupt images, empty or non-image members, truncated or missing shards) is skipped and counted."""

from __future__ import annotations

import io
import os
import re
import socket
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

import vitreg.data.webdataset as wdsmod
from vitreg.data.tar import SkipCounter
from vitreg.data.webdataset import ShardStream, UnusableDataError


def jpeg_bytes(value: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 40, 90)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def make_shards(tmp_path, n_shards: int = 4, per_shard: int = 6) -> list[str]:
    """Label = shard * 100 + index, so every sample says where it came from."""
    urls = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s:02d}_{i:03d}"
            members += [(f"{key}.jpg", jpeg_bytes(s * 100 + i)), (f"{key}.cls", str(s * 100 + i).encode())]
        urls.append(write_tar(tmp_path / f"train-{s:06d}.tar", members))
    return urls


@pytest.fixture(autouse=True)
def fresh_counter(monkeypatch):
    counter = SkipCounter()
    monkeypatch.setattr(wdsmod, "SKIPS", counter)
    return counter


def labels_of(stream, workers: int = 0, limit: int | None = None) -> list[int]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for _, label in loader:
        out.append(int(label))
        if limit is not None and len(out) >= limit:
            break
    return out


def test_each_rank_and_worker_reads_its_own_shards_once(tmp_path, monkeypatch):
    urls = make_shards(tmp_path, n_shards=8)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got = labels_of(ShardStream(urls, resampled=False, shuffle_buffer=4), workers=2)
        shards = {label // 100 for label in got}
        assert shards == set(range(rank, 8, 2))  # shards[rank::world]
        seen += got
    assert sorted(seen) == sorted(s * 100 + i for s in range(8) for i in range(6))  # each sample exactly once


def test_resampled_streams_are_reproducible_and_differ_per_rank(tmp_path, monkeypatch):
    urls = make_shards(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = labels_of(ShardStream(urls, seed=1, shuffle_buffer=8), limit=60)
    again = labels_of(ShardStream(urls, seed=1, shuffle_buffer=8), limit=60)
    other_seed = labels_of(ShardStream(urls, seed=2, shuffle_buffer=8), limit=60)
    monkeypatch.setenv("RANK", "1")
    other_rank = labels_of(ShardStream(urls, seed=1, shuffle_buffer=8), limit=60)
    assert first == again
    assert first != other_seed and first != other_rank
    assert len({label // 100 for label in first}) > 1  # draws several shards


def test_workers_get_different_resampled_streams(tmp_path):
    urls = make_shards(tmp_path)
    loader = DataLoader(ShardStream(urls, seed=3, shuffle_buffer=4), batch_size=6, num_workers=2)
    batches = []
    for _, labels in loader:
        batches.append(labels.tolist())
        if len(batches) == 4:
            break
    # DataLoader alternates workers: batches 0, 2 come from worker 0 and 1, 3 from worker 1
    assert batches[0] != batches[1] and batches[2] != batches[3]


def test_bad_data_is_skipped_counted_and_survived(tmp_path, fresh_counter):
    good = make_shards(tmp_path, n_shards=1, per_shard=4)
    jpeg = jpeg_bytes(7)
    broken = write_tar(
        tmp_path / "broken.tar",
        [
            ("a.jpg", jpeg[: len(jpeg) // 2]),
            ("a.cls", b"900"),  # truncated JPEG
            ("b.jpg", b""),
            ("b.cls", b"901"),  # zero-byte member
            ("c.txt", b"just a caption"),  # no image at all
            ("d.jpg", b"this is not an image"),
            ("d.cls", b"903"),
            ("e.jpg", jpeg_bytes(5, size=8)),
            ("e.cls", b"904"),  # smaller than min_side
            ("f.jpg", jpeg_bytes(9)),
            ("f.cls", b"905"),  # fine
        ],
    )
    whole = Path(good[0]).read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole[:1000])  # cut inside the first JPEG member data (its header is 512 bytes)
    missing = str(tmp_path / "missing.tar")
    stream = ShardStream([good[0], broken, str(truncated), missing], resampled=False, shuffle_buffer=1, min_side=16)
    got = sorted(labels_of(stream))
    assert 905 in got and all(label in got for label in (0, 1, 2, 3))
    assert not {900, 901, 903, 904} & set(got)
    counts = fresh_counter.counts
    assert counts["empty"] == 1 and counts["no_image"] == 1 and counts["too_small"] == 1
    assert counts["truncated"] + counts["corrupt"] >= 1 and counts["not_an_image"] == 1
    assert counts["shard_unreadable"] == 1 and counts["shard_truncated"] == 1


def test_no_readable_shard_is_a_clear_error(tmp_path):
    stream = ShardStream([str(tmp_path / "nope-0.tar"), str(tmp_path / "nope-1.tar")], resampled=True)
    with pytest.raises(RuntimeError, match=r"no readable sample in \d+ shard reads in a row"):
        labels_of(stream, limit=1)


def unusable_shard(path, kind: str, n: int = 50) -> str:
    members = []
    for i in range(n):
        if kind == "too_small":  # CIFAR-size images against 98 px local crops
            members.append((f"{i:04d}.jpg", jpeg_bytes(i, size=32)))
        elif kind == "corrupt":
            members.append((f"{i:04d}.jpg", b"this is not an image"))
        else:  # no image member at all
            members.append((f"{i:04d}.txt", b"a caption without its image"))
        members.append((f"{i:04d}.cls", b"1"))
    return write_tar(path, members)


@pytest.mark.parametrize(
    ("kind", "reason", "fix"),
    [
        ("too_small", "too_small", r"augment\.local_crops_size"),
        ("corrupt", "not_an_image", r"data\.webdataset\.shards"),
        ("missing", "no_image", r"data\.webdataset\.shards"),
    ],
)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_with_no_usable_sample_stops_with_the_reasons(tmp_path, hang_guard, kind, reason, fix, workers):
    """Issue 12 §3: no usable sample used to mean no batch, ever (DataHealth only runs at batch end)."""
    urls = [unusable_shard(tmp_path / f"bad-{s}.tar", kind) for s in range(3)]
    stream = ShardStream(urls, seed=0, shuffle_buffer=16, min_side=98, max_unusable_in_a_row=200)
    loader = DataLoader(stream, batch_size=4, num_workers=workers)
    with pytest.raises(UnusableDataError) as caught:
        next(iter(loader))
    message = caught.value.reason()
    assert message.startswith("the data stream of rank 0, loader worker 0 found no usable sample in the last 200")
    assert f"{reason} 200" in message and re.search(fix, message)
    assert "data.webdataset.max_skip_fraction" in message and "data.webdataset.max_unusable_in_a_row" in message
    if workers == 0:
        assert hang_guard[0] <= 200 + 16  # stopped at the bound (plus the shuffle buffer), not later


def test_nothing_usable_stops_even_when_every_fraction_is_accepted(tmp_path, hang_guard):
    urls = [unusable_shard(tmp_path / "bad.tar", "too_small")]
    stream = ShardStream(urls, min_side=98, shuffle_buffer=4, max_unusable_in_a_row=100, max_skip_fraction=1.0)
    with pytest.raises(UnusableDataError, match=r"too_small 100"):
        labels_of(stream, limit=1)


def test_a_bad_patch_in_a_healthy_stream_is_survived_until_the_fraction_bound(tmp_path, hang_guard):
    """The in-a-row bound alone would kill a long run at its first fully damaged shard: it only stops a
    stream whose unusable fraction is also above max_skip_fraction."""
    good = [(f"g{i:03d}.jpg", jpeg_bytes(i)) for i in range(80)]
    bad = [(f"z{i:03d}.jpg", b"not an image") for i in range(30)]
    patchy = write_tar(tmp_path / "patchy.tar", good + bad)  # 30 bad in a row after 80 good: 27 %
    kept = labels_of(
        ShardStream([patchy], resampled=False, shuffle_buffer=1, max_unusable_in_a_row=10, max_skip_fraction=0.3)
    )
    assert len(kept) == 80
    stream = ShardStream([patchy], resampled=False, shuffle_buffer=1, max_unusable_in_a_row=10, max_skip_fraction=0.2)
    with pytest.raises(UnusableDataError, match=r"not_an_image 21; 21 of the 101 samples"):
        labels_of(stream)  # 10 in a row at 10 of 90 (11 %) goes on; it stops past 20 %: 21 of 101
    with pytest.raises(ValueError, match=r"max_unusable_in_a_row must be >= 1"):
        ShardStream([patchy], max_unusable_in_a_row=0)


def test_empty_shard_list_is_rejected():
    with pytest.raises(ValueError, match=r"data\.webdataset\.shards: no shards given"):
        ShardStream([])


def _rank_stream(rank: int, world: int, port: int, urls: list[str], out: dict) -> None:
    os.environ.pop("RANK", None)
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = DataLoader(ShardStream(urls, seed=5, shuffle_buffer=4), batch_size=4, num_workers=2)
        labels = []
        for _, batch_labels in loader:
            labels += batch_labels.tolist()
            if len(labels) >= 24:
                break
        out[rank] = labels
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_stream_different_reproducible_data(tmp_path):
    urls = make_shards(tmp_path, n_shards=6)

    def run() -> dict:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        manager = mp.Manager()
        out = manager.dict()
        mp.spawn(_rank_stream, args=(2, port, urls, out), nprocs=2, join=True)
        return dict(out)

    first, second = run(), run()
    assert first == second  # the same seed reproduces every rank's stream
    assert first[0] != first[1]  # ranks read different data
    assert torch.tensor(first[0]).unique().numel() > 4


def test_writer_to_reader_round_trip_keeps_labels_and_pixels(tmp_path):
    """A folder of images -> write_shards -> ShardStream gives back every image with its label,
    pixel-identical to decoding the original JPEG (the writer keeps its bytes)."""
    import numpy as np

    from vitreg.data.shards import find_images, write_shards

    originals = {}
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(3):
            path = tmp_path / "src" / name / f"{i}.jpg"
            Image.fromarray(np.random.default_rng(10 * label + i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                path, quality=90
            )
            originals[(label, i)] = np.asarray(Image.open(path).convert("RGB"))
    items, classes = find_images(tmp_path / "src")
    write_shards(items, tmp_path / "shards", max_count=4, class_names=classes, progress=False)
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    got = list(ShardStream(shards, resampled=False, shuffle_buffer=1))
    assert sorted(label for _, label in got) == [0, 0, 0, 1, 1, 1]
    for image, label in got:
        pixels = image.permute(1, 2, 0).numpy()
        matches = [i for i in range(3) if np.array_equal(pixels, originals[(label, i)])]
        assert len(matches) == 1  # identical to the original file's pixels, and in the right class


def test_multicrop_stream_decodes_channels_last_with_the_same_crops(tmp_path, monkeypatch):
    from vitreg.data.decode import decode_image
    from vitreg.data.transforms import MultiCropTransform

    photo = Image.effect_mandelbrot((48, 40), (-2.0, -1.5, 1.0, 1.5), 50).convert("RGB")
    members = []
    for i, mode in enumerate(("RGB", "L", "CMYK")):
        buf = io.BytesIO()
        photo.convert(mode).save(buf, format="JPEG", quality=90)
        members.append((f"k{i}.jpg", buf.getvalue()))
    url = write_tar(tmp_path / "mixed-000000.tar", members)
    transform = MultiCropTransform(global_crops_size=24, local_crops_size=12, local_crops_number=2)
    calls = []
    monkeypatch.setattr(wdsmod, "decode_image", lambda *a, **k: calls.append(k) or decode_image(*a, **k))
    stream = ShardStream([url], transform, resampled=False, shuffle_buffer=1, rank_world=(0, 1))
    got = [crops for crops, _ in stream]
    assert len(got) == 3 and all(k["channels_last"] for k in calls)
    for j, (_, data) in enumerate(members):
        generator = torch.Generator().manual_seed(wdsmod.sample_seed(0, 0, 0, 0, j))
        expected = transform(decode_image(data), generator=generator)  # plain CHW input
        for key in expected:
            assert all(torch.equal(a, b) for a, b in zip(got[j][key], expected[key], strict=True))

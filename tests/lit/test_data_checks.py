"""Issue 12 §3, the data half: shards that do not exist are found at start (before the model is built),
and a training stream in which no sample is usable stops with its reasons instead of hanging."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import vitreg.lit.pretrain as pretrain_mod
from tests.conftest import TINY, compose_config
from tests.data.test_webdataset import jpeg_bytes, write_tar
from vitreg.config import ConfigError, validate_config
from vitreg.data.shards import missing_shards
from vitreg.data.webdataset import UnusableDataError
from vitreg.lit.data import WebDataModule, training_shards
from vitreg.lit.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]


def shard(path: Path, n: int = 8, size: int = 32) -> str:
    members = []
    for i in range(n):
        members += [(f"{path.stem}_{i:03d}.jpg", jpeg_bytes(i, size=size)), (f"{path.stem}_{i:03d}.cls", b"0")]
    return write_tar(path, members)


def web_cfg(tmp_path: Path, shards: str, *extra: str):
    return compose_config(
        [
            *TINY,
            "data=webdataset",
            f"data.webdataset.shards='{shards}'",
            "data.num_workers=0",
            "data.batch_size_per_device=4",
            "data.webdataset.shuffle_buffer=4",
            *extra,
        ],
        run_dir=tmp_path / "run",
    )


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: the data checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the shards were checked")

    monkeypatch.setattr(pretrain_mod, "DINOv2Module", refuse)


@pytest.mark.parametrize("spec", ["absent-{000000..000003}.tar", "empty_folder", "absent-*.tar"])
def test_shards_that_do_not_exist_stop_the_run_at_start(tmp_path, no_model, spec):
    (tmp_path / "empty_folder").mkdir()
    cfg = web_cfg(tmp_path, tmp_path / spec)
    with pytest.raises(ConfigError, match=r"^data\.webdataset\.shards: (none of the 4 shards|no \.tar shards in)"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written


def test_some_missing_shards_warn_with_the_count_and_stream_the_rest(tmp_path, caplog):
    for i in (0, 2):
        shard(tmp_path / f"train-{i:06d}.tar")
    cfg = web_cfg(tmp_path, tmp_path / "train-{000000..000003}.tar")
    with caplog.at_level(logging.WARNING, logger="vitreg.lit.data"):
        module = WebDataModule(cfg)
    assert [Path(u).name for u in module.shards] == ["train-000000.tar", "train-000002.tar"]
    assert "MISSING SHARDS: 2 of the 4 shards of data.webdataset.shards" in caplog.text
    assert "train-000001.tar" in caplog.text and "data.webdataset.missing_shards=error" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["data.webdataset.missing_shards=error"], True),
        (["trainer.num_nodes=2"], True),  # the default on multi-node runs: every node must see the same data
        (["trainer.num_nodes=2", "data.webdataset.missing_shards=warn"], False),
        (["data.webdataset.missing_shards=warn"], False),
    ],
)
def test_missing_shards_switch(tmp_path, overrides, refused):
    shard(tmp_path / "train-000000.tar")
    cfg = web_cfg(tmp_path, tmp_path / "train-{000000..000001}.tar", *overrides)
    if refused:
        with pytest.raises(
            ConfigError, match=r"^data\.webdataset\.missing_shards.*: 1 of the 2 shards .*missing_shards=warn"
        ):
            training_shards(cfg)
    else:
        assert training_shards(cfg) == [str(tmp_path / "train-000000.tar")]


def test_missing_shard_keys_are_validated(tmp_path):
    for override, key in [
        ("data.webdataset.missing_shards=sometimes", "data.webdataset.missing_shards"),
        ("data.webdataset.max_unusable_in_a_row=0", "data.webdataset.max_unusable_in_a_row"),
    ]:
        with pytest.raises(ConfigError, match=rf"^{key}"):
            validate_config(web_cfg(tmp_path, "x-{0..1}.tar", override))


def test_only_local_shards_are_checked(tmp_path):
    present = shard(tmp_path / "a.tar")
    (tmp_path / "folder.tar").mkdir()
    urls = [
        present,
        f"file:{present}",
        f"file://{tmp_path}/gone.tar",
        str(tmp_path / "folder.tar"),
        str(tmp_path / "gone.tar"),
        str(tmp_path / "gone.tar"),
        "pipe:curl -s http://x/a.tar",
        "https://x/b.tar",
        "s3://bucket/c.tar",
        "-",
    ]
    assert missing_shards(urls) == [
        f"file://{tmp_path}/gone.tar",
        str(tmp_path / "folder.tar"),
        str(tmp_path / "gone.tar"),
    ]
    many = [str(tmp_path / f"n{i}.tar") for i in range(300)] + [present]  # the threaded path
    assert missing_shards(many) == many[:-1]


def test_a_run_on_images_too_small_for_the_crops_stops_instead_of_hanging(tmp_path, hang_guard):
    """CIFAR-size images against the crops: every sample is too small, so no batch can ever be made."""
    for i in range(2):
        shard(tmp_path / f"tiny-{i:06d}.tar", n=40, size=8)  # below the 14 px local crops of TINY
    cfg = web_cfg(
        tmp_path,
        tmp_path / "tiny-{000000..000001}.tar",
        "data.num_workers=1",
        "data.webdataset.max_unusable_in_a_row=300",
        "trainer.max_steps=2",
    )
    with pytest.raises(UnusableDataError) as caught:
        pretrain(cfg)
    message = caught.value.reason()
    assert "found no usable sample in the last 300 samples it read (too_small 300" in message
    for key in (
        "augment.local_crops_size",
        "data.webdataset.max_skip_fraction",
        "data.webdataset.max_unusable_in_a_row",
    ):
        assert key in message


@pytest.mark.slow
def test_cli_says_what_is_wrong_with_the_data(tmp_path):
    """train/pretrain.py: one line naming the key, no traceback, a failing exit status."""
    for i in range(2):
        shard(tmp_path / f"tiny-{i:06d}.tar", n=40, size=8)
    common = [
        sys.executable,
        "train/pretrain.py",
        *TINY,
        "data=webdataset",
        "data.num_workers=0",
        "data.batch_size_per_device=4",
        "data.webdataset.max_unusable_in_a_row=100",
        f"paths.output_root={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]

    def run(shards: str) -> subprocess.CompletedProcess:
        pattern = f"data.webdataset.shards='{tmp_path}/{shards}-{{000000..000001}}.tar'"
        return subprocess.run([*common, pattern], cwd=REPO, capture_output=True, text=True, timeout=300)

    absent = run("absent")
    assert absent.returncode == 1
    assert "config error: data.webdataset.shards: none of the 2 shards" in absent.stderr
    assert "Traceback" not in absent.stderr
    small = run("tiny")
    assert small.returncode == 1
    last = small.stderr.strip().splitlines()[-1]
    assert last.startswith("data error: the data stream of rank 0, loader worker 0 found no usable sample")
    assert "too_small 100" in last and "augment.local_crops_size" in last


def test_unusable_data_error_survives_the_worker_boundary():
    err = UnusableDataError(
        "Caught UnusableDataError in DataLoader worker process 0.\nOriginal Traceback ...\n"
        "vitreg.data.webdataset.UnusableDataError: the data stream ... stopped"
    )
    assert err.reason() == "the data stream ... stopped"
    cfg = compose_config(["data=webdataset"])
    assert cfg.data.webdataset.max_unusable_in_a_row == 1000 and cfg.data.webdataset.missing_shards is None

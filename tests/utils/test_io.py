"""Atomic writes: readable by the user's group like any file, durable, and no garbage left forever."""

from __future__ import annotations

import os
import stat

import pytest

from vitreg.utils import io
from vitreg.utils.io import atomic_write_bytes, current_umask, remove_stale_temp_files


@pytest.fixture
def umask_002():
    previous = os.umask(0o002)
    yield
    os.umask(previous)


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path, umask_002):
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    written = atomic_write_bytes(tmp_path / "atomic", b"x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o664


def test_umask_is_read_without_changing_it(umask_002):
    assert current_umask() == 0o002
    assert os.umask(0o002) == 0o002


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(io, "fsync_directory", lambda path: synced.append(path))
    atomic_write_bytes(tmp_path / "sub" / "file", b"x")
    assert synced == [tmp_path / "sub"]


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path):
    stale = [tmp_path / ".last.ckpt.k2j3h4_x.tmp", tmp_path / ".step0000040.ckpt.abcdefgh.tmp"]
    keep = [tmp_path / "last.ckpt", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in stale + keep:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_sharded_checkpoints_staging_directory_is_removed(tmp_path):
    staging = tmp_path / ".last.ckpt.0a1b2c3d.tmp"
    (staging / "sub").mkdir(parents=True)
    (staging / "__0_0.distcp").write_bytes(b"x" * 10)
    assert remove_stale_temp_files(tmp_path) == [staging] and not staging.exists()

"""The sharding CLI, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import webdataset as wds

from tests.data.test_shards import make_broken, make_tree

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_shards.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_tree_with_broken_files_exits_zero(tmp_path):
    make_tree(tmp_path / "src")
    make_broken(tmp_path / "src" / "dog")
    out = tmp_path / "shards"
    result = run(str(tmp_path / "src"), str(out), "--max-count", "5", "--workers", "2", "--seed", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "found 14 images in 3 classes" in result.stdout
    assert "wrote 11 images to 3 shard(s)" in result.stdout and "skipped 3 file(s)" in result.stdout
    assert "train-{000000..000002}.tar" in result.stdout and "truncated.jpg: corrupt image" in result.stdout
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "zebra"]
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    assert len(samples) == 11 and all({"jpg", "cls", "json"} <= set(s) for s in samples)

    again = run(str(tmp_path / "src"), str(out), "--quiet")
    assert again.returncode != 0 and "already has 3 train-*.tar shard(s)" in again.stderr
    assert "--overwrite" in again.stderr


def test_empty_or_unreadable_source_fails_with_a_message(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert result.returncode != 0 and "no images found in" in result.stderr
    assert not (tmp_path / "out").exists()

    make_broken(tmp_path / "broken")
    result = run(str(tmp_path / "broken"), str(tmp_path / "out"), "--kind", "flat", "--workers", "1", "--quiet")
    assert result.returncode != 0 and "none of the 3 images could be read" in result.stderr
    assert "skipped 3 file(s)" in result.stdout and not list((tmp_path / "out").glob("*.tar"))

"""One owner of checkpoint names: no versioned copies, resume by the step inside each file (not its
name), a payload checksum that catches bit rot, and what a killed write leaves removed at start."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from tests.runtime.test_preemption_training import SendSignal
from vitreg.lit.checkpointing import (
    CHECKSUM_KEY,
    AtomicCheckpointIO,
    newest_good_checkpoint,
    readable,
    resume_candidates,
)
from vitreg.lit.pretrain import pretrain


def save(path, step: int, fill: float = 1.0) -> None:
    state = {"w": torch.full((1000,), fill), "b": torch.arange(10, dtype=torch.bfloat16)}
    AtomicCheckpointIO().save_checkpoint({"state_dict": state, "global_step": step}, path)


def flip_one_payload_byte(path, fill: float) -> None:
    """Bit rot inside a tensor's data (the zip stays valid: torch stores tensors uncompressed)."""
    data = bytearray(path.read_bytes())
    needle = torch.full((4,), fill).numpy().tobytes()
    at = data.find(needle)
    assert at > 0
    data[at + 1] ^= 0x10
    path.write_bytes(bytes(data))


def test_resume_takes_the_newest_step_not_the_name(tmp_path):
    save(tmp_path / "last.ckpt", 8)
    save(tmp_path / "step0000008.ckpt", 8)
    save(tmp_path / "step0000012.ckpt", 12)  # killed between writing step 12 and last.ckpt
    save(tmp_path / "last-v1.ckpt", 10)  # a versioned copy made by an older vitreg
    assert newest_good_checkpoint(tmp_path) == tmp_path / "step0000012.ckpt"
    assert [p.name for p in resume_candidates(tmp_path)] == [
        "step0000012.ckpt",
        "last-v1.ckpt",
        "last.ckpt",  # first among equals
        "step0000008.ckpt",
    ]


def test_checksum_catches_bit_rot_and_resume_falls_back(tmp_path, caplog):
    save(tmp_path / "step0000004.ckpt", 4, fill=4.25)
    save(tmp_path / "last.ckpt", 6, fill=6.25)
    stored = torch.load(tmp_path / "last.ckpt", weights_only=True)[CHECKSUM_KEY]
    assert stored["tensors"] == 2 and stored["bytes"] == 1000 * 4 + 10 * 2
    flip_one_payload_byte(tmp_path / "last.ckpt", 6.25)
    assert readable(tmp_path / "last.ckpt") is None  # still loads: only the checksum notices
    assert "checksum" in readable(tmp_path / "last.ckpt", verify_checksum=True)
    with caplog.at_level(logging.WARNING):
        assert newest_good_checkpoint(tmp_path) == tmp_path / "step0000004.ckpt"
    assert "last.ckpt is damaged" in caplog.text and "falling back to" in caplog.text


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "last.ckpt")
    assert newest_good_checkpoint(tmp_path) == tmp_path / "last.ckpt"


@pytest.mark.slow
def test_preemption_before_the_first_checkpoint_never_leaves_last_ckpt_stale(tmp_path):
    """Preempted at step 2 (before the first periodic checkpoint), requeued, run on past two periodic
    checkpoints: last.ckpt is the newest state and no versioned file (last-v1.ckpt) exists."""
    run = tmp_path / "run"
    cfg = compose_config([*TINY, "trainer.max_steps=12", "callbacks.checkpoint_every_n_steps=4"], run_dir=run)
    stale = run / "checkpoints" / ".last.ckpt.killed01.tmp"  # what a kill -9 mid-write leaves
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 1000)
    stopped = pretrain(cfg, extra_callbacks=[SendSignal(signal.SIGUSR1, at=2)])
    assert stopped["steps"] in (2, 3) and not stale.exists()  # the signal lands at the end of step 2
    with open_dict(cfg):
        cfg.trainer.max_steps = 9
    resumed = pretrain(cfg)
    assert resumed["steps"] == 9
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000004.ckpt", "step0000008.ckpt"]
    # step 9 is off the every-4 grid: the end of training saves it, so nothing of the run is lost
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    assert resumed["checkpoint"] == str(newest_good_checkpoint(run / "checkpoints"))


def test_a_sharded_directory_is_replaced_whole(tmp_path):
    from vitreg.lit.strategies import replace_directory

    final, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.abcd.tmp"
    for folder, tag in ((final, b"old"), (staging, b"new")):
        folder.mkdir()
        (folder / "__0_0.distcp").write_bytes(tag)
    (final / "__1_0.distcp").write_bytes(b"old")  # a shard the new checkpoint does not have
    replace_directory(staging, final, "abcd")
    assert sorted(p.name for p in final.iterdir()) == ["__0_0.distcp"]
    assert (final / "__0_0.distcp").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

"""Resume refuses what it cannot continue, before touching the run: meaningful config changes are
refused with a diff and the ways out, harmless ones are allowed, and a finished run ends at once."""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from vitreg.lit.pretrain import pretrain
from vitreg.lit.resume_check import ResumeConfigError, check_resume_config, is_meaningful

SAVED = {
    "seed": 0,
    "data": {"batch_size_per_device": 64, "num_workers": 8, "webdataset": {"shards": "a-{0..9}.tar"}},
    "model": {"arch": "vitl", "attn_backend": "auto"},
    "trainer": {"max_steps": 100, "log_every_n_steps": 10},
}


def changed(**dotted):
    import copy

    cfg = copy.deepcopy(SAVED)
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"data__batch_size_per_device": 32}, "data.batch_size_per_device"),
        ({"seed": 1}, "seed"),
        ({"data__webdataset__shards": "b-{0..9}.tar"}, "data.webdataset.shards"),
        ({"model__arch": "vitb"}, "model.arch"),
    ],
)
def test_meaningful_changes_are_refused_with_a_diff_and_the_ways_out(change, key):
    with pytest.raises(ResumeConfigError) as err:
        check_resume_config(SAVED, changed(**change), "last.ckpt")
    message = str(err.value)
    assert key in message and "->" in message
    assert "run_name=" in message and "resume=never" in message and f"resume_allow_changes=[{key}]" in message


def test_harmless_changes_are_allowed_and_reported():
    new = changed(trainer__max_steps=200, trainer__log_every_n_steps=1, data__num_workers=4, model__attn_backend="math")
    accepted = check_resume_config(SAVED, new, "last.ckpt")
    assert set(accepted) == {"trainer.max_steps", "trainer.log_every_n_steps", "data.num_workers", "model.attn_backend"}


def test_allowed_keys_and_options_newer_than_the_checkpoint_pass():
    new = changed(data__webdataset__shards="/fast/a-{0..9}.tar")
    assert check_resume_config(SAVED, new, "x", allowed=["data.webdataset.shards"])
    assert check_resume_config(SAVED, {**SAVED, "ssl": {"max_skipped_steps": 10}}, "x") == {}
    assert not is_meaningful("seeds") and is_meaningful("seed") and is_meaningful("optim.base_lr")


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_untouched_and_a_finished_run_ends_at_once(tmp_path):
    run = tmp_path / "run"
    cfg = compose_config([*TINY, "trainer.max_steps=2", "logger=wandb", "logger.wandb.mode=offline"], run_dir=run)
    assert pretrain(cfg)["steps"] == 2
    config_yaml = (run / "config.yaml").read_text()
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1

    with open_dict(cfg):
        cfg.data.batch_size_per_device = 2
        cfg.trainer.max_steps = 4
    with pytest.raises(ResumeConfigError, match=r"data\.batch_size_per_device: 4 -> 2"):
        pretrain(cfg)
    assert (run / "config.yaml").read_text() == config_yaml  # never overwritten by a refused resume

    with open_dict(cfg):
        cfg.data.batch_size_per_device = 4
        cfg.trainer.max_steps = 2
    summary = pretrain(cfg)  # the same run again: already finished
    assert summary["finished"] and summary["steps"] == 2
    assert "already finished" in summary["already_finished"] and "trainer.max_steps" in summary["already_finished"]
    assert sorted((run / "wandb").glob("offline-run-*")) == wandb_runs  # no empty W&B run

    with open_dict(cfg):
        cfg.trainer.max_steps = 3
        cfg.trainer.log_every_n_steps = 1  # harmless: allowed
    assert pretrain(cfg)["steps"] == 3

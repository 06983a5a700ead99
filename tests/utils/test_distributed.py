"""The collectives module in one process: every helper is the identity without a process group, and the
launcher's variables count only where asked for. Real ranks: tests/ssl, tests/eval and tests/lit."""

from __future__ import annotations

import pytest
import torch

from vitreg.utils.distributed import (
    all_gather_cat,
    all_reduce_,
    all_reduce_many_,
    gather_objects,
    gather_rows,
    is_distributed,
    is_initialized,
    rank_and_world,
)

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def no_launcher(monkeypatch):
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_one_process_without_a_group(no_launcher):
    assert not is_initialized() and not is_distributed()
    assert rank_and_world() == (0, 1) and rank_and_world(launcher_env=True) == (0, 1)


def test_the_launchers_variables_count_only_for_launcher_env(no_launcher):
    no_launcher.setenv("SLURM_PROCID", "3")
    no_launcher.setenv("SLURM_NTASKS", "4")
    assert rank_and_world(launcher_env=True) == (3, 4)
    no_launcher.setenv("RANK", "1")
    no_launcher.setenv("WORLD_SIZE", "2")
    assert rank_and_world(launcher_env=True) == (1, 2)  # torchrun's names first
    assert rank_and_world() == (0, 1)  # a collective needs the group itself


def test_every_helper_is_the_identity_without_a_group():
    t = torch.arange(6.0).view(3, 2)
    for op in ("sum", "mean", "max", "min"):
        assert all_reduce_(t, op) is t
        all_reduce_many_([t], op)
    assert torch.equal(t, torch.arange(6.0).view(3, 2))
    assert gather_rows(t) is t and all_gather_cat(t, dim=1) is t
    assert gather_objects({"step": 3}) == [{"step": 3}]


def test_an_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce_(torch.zeros(1), "avg")
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce_many_([torch.zeros(1)], "avg")

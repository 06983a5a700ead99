"""What ``pretrain()`` refuses at start, before it builds a model or writes into the run directory."""

from __future__ import annotations

import time

import pytest

from tests.conftest import TINY, compose_config
from vitreg.config import ConfigError
from vitreg.lit.pretrain import pretrain


def test_multi_node_without_a_launcher_fails_at_once(tmp_path, monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = compose_config([*TINY, "trainer.num_nodes=2", "trainer.max_steps=1"], run_dir=tmp_path / "run")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes: .*torchrun --nnodes=2"):
        pretrain(cfg)
    assert time.monotonic() - start < 10  # instead of a 30-minute wait in process-group init
    assert not (tmp_path / "run").exists()

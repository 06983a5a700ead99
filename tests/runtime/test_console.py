"""One console per run: rank 0 prints the summary and the probe lines, the other ranks only warnings.

The slow test runs train/pretrain.py under torchrun with two gloo processes (DDP on CPU) and counts lines.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from vitreg.runtime.console import PACKAGE_LOGGER, quiet_other_ranks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_level():
    logger = logging.getLogger(PACKAGE_LOGGER)
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.parametrize(("rank", "infos"), [(0, 1), (1, 0)])
def test_other_ranks_keep_warnings_and_drop_info(rank, infos, caplog, restore_level):
    quiet_other_ranks(rank)
    child = logging.getLogger("vitreg.lit.probes")  # any module logger under the package
    with caplog.at_level(logging.INFO):
        child.info("kNN top-1 of the teacher at step 0: ...")
        child.warning("a problem of this rank")
    assert [r.levelno for r in caplog.records].count(logging.INFO) == infos
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == ["a problem of this rank"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_print_one_summary_and_one_line_per_probe(tmp_path):
    """DDP with 2 processes: each kNN / linear probe line and the run summary appear once (before: once per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WANDB_MODE", None)
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"),
        *("--master_addr=127.0.0.1", f"--master_port={_free_port()}", "train/pretrain.py"),
        *TINY,
        *("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"),
        *("trainer.max_steps=3", "callbacks.telemetry.enabled=false"),
        *("callbacks.online_knn.enabled=true", "callbacks.online_knn.num_workers=0"),
        *("callbacks.online_linear.enabled=true", "callbacks.online_linear.num_workers=0"),
        f"paths.output_root={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout.splitlines()
    knn = [line for line in out if "kNN top-1 of the teacher at step" in line]
    assert len(knn) == 2, out  # before (step 0) and after (step 3), once each
    assert sum("linear probe top-1 on the val probe set at step 3" in line for line in out) == 1, out
    assert sum(line.startswith("run directory:") for line in out) == 1, out

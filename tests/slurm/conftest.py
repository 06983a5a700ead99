"""Fixtures for tests against a real (throwaway, single-node) SLURM cluster."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import SlurmCluster, ensure_slurm_installed


@pytest.fixture
def slurm_cluster(tmp_path):
    """A running single-node cluster whose files live in ``tmp_path/slurm``; its jobs are cancelled
    and its daemons stopped (by PID) when the test ends, whatever happened."""
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path / "slurm")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

"""Runtime tests never see the SLURM variables of a job they might run in (CI on a cluster):
a test that preempts must not requeue a real job."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def no_slurm_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)

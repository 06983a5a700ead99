"""conf/hydra/launcher/submitit_slurm.yaml: the sweep's jobs as the plugin would submit them (sbatch text built by
submitit, nothing submitted), with vitreg's PreemptionHandler as the one requeue owner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import CONF_DIR
from vitreg.config import register_configs
from vitreg.runtime.run_dir import register_resolvers

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra: pip install 'vitreg[slurm]'")
REPO = Path(__file__).resolve().parents[2]


def sbatch_text(tmp_path: Path, overrides: list[str]) -> str:
    """The sbatch script submitit writes for the sweep's array (``map_array`` stubbed: nothing is submitted)."""
    import submitit

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="pretrain",
            overrides=["hydra/launcher=submitit_slurm", f"paths.output_root={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    seen = {}

    def capture(executor, fn, *args):
        seen["executor"] = executor
        return []

    original = submitit.AutoExecutor.map_array
    submitit.AutoExecutor.map_array = capture
    try:
        launcher.launch([["registers=0"], ["registers=4"]], initial_job_idx=0)
    finally:
        submitit.AutoExecutor.map_array = original
    return seen["executor"]._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")


@pytest.mark.filterwarnings("ignore:.*ConfigStore schema")  # train/pretrain.py filters it the same way
def test_preemption_handler_owns_requeue(tmp_path):
    text = sbatch_text(tmp_path, ["run_name=regs", "hydra.launcher.partition=gpu"])
    lines = text.splitlines()
    assert "#SBATCH --signal=USR1@180" in lines  # PreemptionHandler's signal, to every task
    assert not any("USR2" in line for line in lines)  # submitit's own requeue signal is never sent
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --job-name=vitreg-regs" in lines
    assert "#SBATCH --time=2880" in lines


@pytest.mark.slow
def test_the_sweep_command_composes(tmp_path):
    """The README's command, up to the launch (--cfg hydra prints the launcher it would use)."""
    done = subprocess.run(
        [sys.executable, "train/pretrain.py", "registers=4", "hydra/launcher=submitit_slurm", "--cfg", "hydra"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in done.stdout
    assert "ConfigStore schema" not in done.stderr  # the plugin's schema validates our file without a warning

"""Run directories: deterministic, the same on every rank and restart (vitreg/runtime/run_dir.py)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR
from vitreg.config import ConfigError, register_configs, validate_config
from vitreg.runtime.run_dir import register_resolvers, resolve_run_dir, shorten_overrides

ARRAY = {"SLURM_JOB_ID": "1235", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "3"}
PLAIN_JOB = {"SLURM_JOB_ID": "999", "SLURM_PROCID": "1"}


@pytest.mark.parametrize(
    ("env", "run_id", "overrides", "multirun", "expected"),
    [
        ({}, None, "", False, "out/exp"),  # a plain run: output_root/run_name
        ({}, None, "registers=4", False, "out/exp"),  # overrides do not rename a single run
        ({}, "try2", "registers=4", False, "out/exp/try2"),
        (PLAIN_JOB, None, "registers=4", False, "out/exp"),  # a non-array job: as a plain run
        (PLAIN_JOB, "vitl", "", False, "out/exp/vitl"),
        (ARRAY, None, "registers=4", False, "out/exp/array1234_3-registers=4"),
        (ARRAY, None, "", False, "out/exp/array1234_3"),
        (ARRAY, "ignored", "registers=4", False, "out/exp/array1234_3-registers=4"),  # array ids win
        ({}, None, "registers=4", True, "out/exp/registers=4"),  # Hydra -m: the sweep subdir
        ({}, "s1", "registers=4", True, "out/exp/s1/registers=4"),
        (ARRAY, None, "registers=4", True, "out/exp/registers=4"),  # multirun: Hydra's layout
        ({"SLURM_ARRAY_JOB_ID": "5"}, None, "registers=1", False, "out/exp"),  # half an array id: ignored
    ],
)
def test_run_dir_table(env, run_id, overrides, multirun, expected):
    got = resolve_run_dir(
        env, output_root="out", run_name="exp", run_id=run_id, override_dirname=overrides, multirun=multirun
    )
    assert got == expected


def test_requeued_task_and_every_rank_get_the_same_dir():
    first = resolve_run_dir(
        {**ARRAY, "SLURM_PROCID": "0"}, output_root="o", run_name="r", override_dirname="registers=2"
    )
    rank7 = resolve_run_dir(
        {**ARRAY, "SLURM_PROCID": "7"}, output_root="o", run_name="r", override_dirname="registers=2"
    )
    requeued = resolve_run_dir(
        {**ARRAY, "SLURM_RESTART_COUNT": "1", "SLURM_JOB_ID": "2000"},
        output_root="o",
        run_name="r",
        override_dirname="registers=2",
    )
    assert first == rank7 == requeued == "o/r/array1234_3-registers=2"


def test_long_overrides_keep_registers_and_a_stable_hash():
    long = ",".join([f"augment.key{i}=value{i}" for i in range(20)] + ["model=vitl", "registers=8", "seed=3"])
    short = shorten_overrides(long)
    assert short.startswith("registers=8,model=vitl,overrides-") and len(short) < 80
    assert short == shorten_overrides(long)  # deterministic
    assert short != shorten_overrides(long.replace("seed=3", "seed=4"))
    assert shorten_overrides("registers=4,seed=1") == "registers=4,seed=1"
    assert shorten_overrides("data.webdataset.shards=/data/x.tar") == "data.webdataset.shards=_data_x.tar"
    listy = ",".join([f"k{i}=[1,2,3]" for i in range(30)] + ["registers=[1,2]"])
    assert shorten_overrides(listy).startswith("registers=[1,2],overrides-")


def _hydra_dirs(overrides: list[str]) -> tuple[str, str, str]:
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides, return_hydra_config=True)
    return cfg.hydra.run.dir, cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir


def test_hydra_config_uses_the_resolvers(monkeypatch):
    for key in ARRAY:
        monkeypatch.delenv(key, raising=False)
    run, sweep, subdir = _hydra_dirs(["registers=2", "paths.output_root=/o", "run_name=x"])
    assert (run, sweep, subdir) == ("/o/x", "/o/x", "registers=2")
    assert _hydra_dirs(["registers=2", "paths.output_root=/o", "run_name=x", "run_id=a"])[:2] == ("/o/x/a", "/o/x/a")
    for key, value in ARRAY.items():
        monkeypatch.setenv(key, value)
    # keys that do not change what is trained (run_id, paths, launch plumbing) stay out of the name
    run, _, _ = _hydra_dirs(
        ["registers=2", "paths.output_root=/o", "run_name=x", "trainer.devices=8", "trainer.num_nodes=2", "run_id=b"]
    )
    assert run == "/o/x/array1234_3-registers=2"


def test_run_id_and_signals_are_validated():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["model=vitt"])
    assert cfg.run_id is None and cfg.runtime.requeue is True and list(cfg.runtime.signals) == ["SIGUSR1", "SIGTERM"]
    validate_config(cfg)
    for key, value, message in [
        ("run_id", "a/b", "run_id"),
        ("runtime.signals", ["SIGUSR1", "SIGNOPE"], "runtime.signals"),
    ]:
        bad = cfg.copy()
        OmegaConf.update(bad, key, value)
        with pytest.raises(ConfigError, match=message):
            validate_config(bad)
    ok = cfg.copy()
    OmegaConf.update(ok, "runtime.signals", ["USR2", "SIGTERM"])
    validate_config(ok)


def test_a_run_name_escaping_output_root_is_refused_before_hydra_creates_it():
    from vitreg.config import ConfigError
    from vitreg.runtime.run_dir import _run_dir_resolver, _sweep_dir_resolver

    with pytest.raises(ConfigError, match="run_name"):
        _run_dir_resolver("outputs", "../elsewhere", None, "")
    with pytest.raises(ConfigError, match="run_name"):
        _sweep_dir_resolver("outputs", "/abs", None)

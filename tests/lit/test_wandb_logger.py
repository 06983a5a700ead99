"""logger=wandb: the mode decision, run id / name / group / tags, and an offline round trip read
back from the run's .wandb file. Never touches the network or the developer's W&B settings."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from tests.wandb_offline import read_offline_run
from vitreg.config import ConfigError, validate_config
from vitreg.lit.wandb_logger import (
    build_wandb_logger,
    log_wandb_media,
    resolve_wandb_mode,
    send_wandb_alert,
    wandb_group,
    wandb_loggers,
    wandb_name,
    wandb_run_id,
    wandb_tags,
)


def never(host: str, port: int) -> bool:
    raise AssertionError("must not probe the network")


def always(host: str, port: int) -> bool:
    return True


def nowhere(host: str, port: int) -> bool:
    return False


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """A HOME without W&B settings or netrc, no W&B variables from the developer's shell."""
    for key in list(os.environ):
        if key.startswith(("WANDB_", "SLURM_")) or key in ("NETRC", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    yield home
    import wandb

    if wandb.run is not None:
        wandb.finish()


def wandb_cfg(tmp_path, *overrides: str, run_dir=None):
    cfg = compose_config([*TINY, "logger=wandb", *overrides], run_dir=run_dir or tmp_path / "out" / "demo")
    with open_dict(cfg):
        cfg.paths.output_root = str(tmp_path / "out")
    return cfg


# ------------------------------------------------------------------------------------------ mode
def test_explicit_modes_are_kept_and_never_probe():
    for mode in ("online", "offline", "disabled"):
        assert resolve_wandb_mode(mode, {"WANDB_MODE": "offline"}, never)[0] == mode


def test_auto_respects_wandb_mode_from_the_environment():
    mode, reason = resolve_wandb_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, never)
    assert mode == "disabled" and "WANDB_MODE" in reason


def test_auto_without_credentials_goes_offline(isolated_wandb):
    mode, reason = resolve_wandb_mode("auto", {"HOME": str(isolated_wandb)}, never)
    assert mode == "offline" and "credentials" in reason


def test_auto_with_a_key_but_unreachable_server_goes_offline():
    probed = []

    def down(host, port):
        probed.append((host, port))
        return False

    env = {"WANDB_API_KEY": "k", "WANDB_BASE_URL": "http://wandb.local:8080"}
    mode, reason = resolve_wandb_mode("auto", env, down)
    assert mode == "offline" and "unreachable" in reason and probed == [("wandb.local", 8080)]


def test_auto_with_a_netrc_entry_and_a_reachable_server_goes_online(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    probed = []

    def up(host, port):
        probed.append((host, port))
        return True

    assert resolve_wandb_mode("auto", {"NETRC": str(netrc)}, up)[0] == "online"
    assert probed == [("api.wandb.ai", 443)]
    # an entry for another host is no credential for this one
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc), "WANDB_BASE_URL": "https://w.example"}, up)[0] == "offline"


def test_auto_probes_the_proxy_when_one_is_set():
    probed = []
    env = {"WANDB_API_KEY": "k", "HTTPS_PROXY": "http://proxy.corp:3128"}
    resolve_wandb_mode("auto", env, lambda h, p: probed.append((h, p)) or True)
    assert probed == [("proxy.corp", 3128)]


def test_unknown_mode_fails_at_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"logger\.wandb\.mode"):
        validate_config(wandb_cfg(tmp_path, "logger.wandb.mode=sometimes"))
    with pytest.raises(ConfigError, match=r"logger\.wandb\.id"):
        validate_config(wandb_cfg(tmp_path, "logger.wandb.id=a/b"))
    validate_config(wandb_cfg(tmp_path))  # the default (auto) is valid


# ------------------------------------------------------------------------------ id, name, group
def test_run_id_is_created_once_and_an_explicit_id_wins(tmp_path):
    run_dir = tmp_path / "run"
    first = wandb_run_id(run_dir)
    assert first == wandb_run_id(run_dir) == (run_dir / "wandb_id.txt").read_text()
    assert len(first) == 12 and not list(run_dir.glob(".wandb_id.txt.*"))  # no temp files left
    assert wandb_run_id(run_dir, "chosen") == "chosen"
    assert wandb_run_id(run_dir) == "chosen"  # recorded: a restart without the override continues it


def test_builder_keeps_the_id_across_builds(tmp_path):
    cfg = wandb_cfg(tmp_path, "logger.wandb.mode=disabled")
    run_dir = tmp_path / "out" / "demo"
    first = build_wandb_logger(cfg, run_dir)._wandb_init
    second = build_wandb_logger(cfg, run_dir)._wandb_init
    assert first["id"] == second["id"] == (run_dir / "wandb_id.txt").read_text()
    assert first["resume"] == "allow" and first["dir"] == str(run_dir) and first["mode"] == "disabled"
    assert first["config"]["registers"] == 4 and first["config"]["model"]["arch"] == "vitt"
    explicit = build_wandb_logger(wandb_cfg(tmp_path, "logger.wandb.id=mine", "logger.wandb.mode=disabled"), run_dir)
    assert explicit._wandb_init["id"] == "mine"


def test_name_and_group_of_a_single_run(tmp_path):
    cfg = wandb_cfg(tmp_path)
    run_dir = tmp_path / "out" / "demo"
    assert wandb_name(cfg, run_dir) == "demo"
    assert wandb_group(cfg, run_dir, env={}) is None
    assert wandb_name(cfg, tmp_path / "elsewhere") == "demo"  # not under output_root: run_name


def test_a_sweep_job_is_named_by_its_dir_and_grouped_by_run_name(tmp_path):
    cfg = wandb_cfg(tmp_path)
    job_dir = tmp_path / "out" / "demo" / "registers=4"
    assert wandb_name(cfg, job_dir) == "demo/registers=4"
    assert wandb_group(cfg, job_dir, env={}) == "demo"


def test_slurm_array_groups_and_explicit_values_win(tmp_path):
    cfg = wandb_cfg(tmp_path)
    run_dir = tmp_path / "out" / "demo"
    assert wandb_group(cfg, run_dir, env={"SLURM_ARRAY_JOB_ID": "777"}) == "demo-array777"
    cfg = wandb_cfg(tmp_path, "logger.wandb.group=mine", "logger.wandb.name=nice")
    assert wandb_group(cfg, run_dir, env={"SLURM_ARRAY_JOB_ID": "777"}) == "mine"
    assert wandb_name(cfg, run_dir) == "nice"


def test_tags_add_registers_and_model_once(tmp_path):
    cfg = wandb_cfg(tmp_path, "logger.wandb.tags=[ablation,'registers=4']")
    assert wandb_tags(cfg) == ["ablation", "registers=4", "model=vitt"]


# ----------------------------------------------------------------------------------------- media
def test_media_helpers_are_no_ops_without_wandb_or_off_rank_zero(tmp_path):
    assert wandb_loggers(SimpleNamespace(loggers=[])) == []
    log_wandb_media(SimpleNamespace(loggers=[], is_global_zero=True), {"x": ("image", None, None)}, step=1)

    class Exploding:
        def __getattr__(self, name):
            raise AssertionError("rank != 0 must not touch the logger")

    logger = build_wandb_logger(wandb_cfg(tmp_path, "logger.wandb.mode=disabled"), tmp_path / "out" / "demo")
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=False)
    logger._experiment = Exploding()
    log_wandb_media(trainer, {"x": ("histogram", np.ones(2), np.arange(3.0))}, step=1)


def test_bad_media_is_rejected_with_its_key(tmp_path):
    logger = build_wandb_logger(wandb_cfg(tmp_path, "logger.wandb.mode=disabled"), tmp_path / "out" / "demo")
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True)
    with pytest.raises(ValueError, match="hist"):
        log_wandb_media(trainer, {"hist": ("histogram", np.ones(3), np.arange(3.0))}, step=1)
    with pytest.raises(ValueError, match="img"):
        log_wandb_media(trainer, {"img": ("image", np.zeros((4, 4, 3)), None)}, step=1)  # float, not uint8
    with pytest.raises(ValueError, match="what"):
        log_wandb_media(trainer, {"what": ("video", None)}, step=1)


def test_offline_round_trip_scalars_histogram_and_image(tmp_path, isolated_wandb):
    """auto + no credentials -> offline; everything logged comes back from run-<id>.wandb."""
    cfg = wandb_cfg(tmp_path, "logger.wandb.notes=hello", "logger.wandb.job_type=pretrain")
    run_dir = tmp_path / "out" / "demo" / "registers=4"
    logger = build_wandb_logger(cfg, run_dir)
    assert logger._wandb_init["mode"] == "offline"
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True)

    logger.log_metrics({"train/loss": 2.5, "lr": 0.1}, step=0)
    logger.log_metrics({"train/loss": 1.25, "lr": 0.05}, step=10)
    counts, edges = np.array([3, 0, 5, 2]), np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    image = np.zeros((6, 10, 3), np.uint8)
    image[:, :5, 0] = 255
    gray = np.full((4, 4), 128, np.uint8)
    media = {
        "tokens/norms": ("histogram", counts, edges),
        "attn/map": ("image", image, "step 10"),
        "attn/gray": ("image", gray, None),
    }
    log_wandb_media(trainer, media, step=10)
    logger.experiment.finish()

    run = read_offline_run(run_dir)
    run_id = (run_dir / "wandb_id.txt").read_text()
    assert run["run_id"] == run_id and run["dir"].name.endswith(run_id)
    assert run["name"] == "demo/registers=4" and run["group"] == "demo"
    assert run["notes"] == "hello" and run["job_type"] == "pretrain"
    assert {"registers=4", "model=vitt"} <= set(run["tags"])
    assert run["config"]["registers"] == 4 and run["config"]["model"]["arch"] == "vitt"

    rows = [r for r in run["history"] if "trainer/global_step" in r]
    scalars = [(r["trainer/global_step"], r["train/loss"], r["lr"]) for r in rows if "train/loss" in r]
    assert scalars == [(0, 2.5, 0.1), (10, 1.25, 0.05)]
    (row,) = [r for r in rows if "tokens/norms" in r]
    assert row["trainer/global_step"] == 10  # the same x as the scalars of step 10
    hist = row["tokens/norms"]
    assert hist["_type"] == "histogram" and hist["values"] == [3, 0, 5, 2] and hist["bins"] == edges.tolist()
    img = row["attn/map"]
    assert img["_type"] == "image-file" and (img["width"], img["height"]) == (10, 6)
    assert img["caption"] == "step 10" and (run["dir"] / "files" / img["path"]).is_file()
    assert row["attn/gray"]["_type"] == "image-file" and row["attn/gray"]["width"] == 4


def test_a_tiny_trainer_logs_scalars_and_media_on_one_axis(tmp_path, isolated_wandb):
    """Through a real Trainer: media logged from a callback share trainer/global_step with the
    scalars Lightning logs for the same batch (the step seen in training_step)."""
    import lightning as L
    import torch

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            self.log("seen_step", float(self.global_step))
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Media(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            log_wandb_media(trainer, {"h": ("histogram", np.ones(2), np.arange(3.0))}, step=trainer.global_step)

    run_dir = tmp_path / "out" / "demo"
    logger = build_wandb_logger(wandb_cfg(tmp_path, "logger.wandb.mode=offline"), run_dir)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(3, 2)), batch_size=1)
    trainer = L.Trainer(
        max_steps=3,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[Media()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), train_dataloaders=data)
    logger.experiment.finish()

    rows = read_offline_run(run_dir)["history"]
    scalars = {r["trainer/global_step"]: r["seen_step"] for r in rows if "seen_step" in r}
    media = sorted(r["trainer/global_step"] for r in rows if "h" in r)
    assert scalars == {0: 0.0, 1: 1.0, 2: 2.0} and media == [0, 1, 2]


def test_the_config_is_logged_once_and_alerts_reach_the_offline_run(tmp_path, isolated_wandb):
    """The resolved config is the run config (top level); the module's ``cfg`` hyperparameter, the same
    config, is not added again as ``cfg.*``; other hyperparameters are. Alerts are recorded offline."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    cfg = wandb_cfg(tmp_path, "logger.wandb.mode=offline")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True), "world_size": 1})
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    run_dir = tmp_path / "out" / "demo"
    logger = build_wandb_logger(cfg, run_dir)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 2)), batch_size=1)
    trainer = L.Trainer(
        max_steps=1, logger=logger, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.fit(Tiny(), train_dataloaders=data)
    assert send_wandb_alert(trainer, "artifacts", "step 1: layer 6") is True
    assert send_wandb_alert(SimpleNamespace(loggers=[], is_global_zero=True), "t", "x") is False
    logger.experiment.finish()

    run = read_offline_run(run_dir)
    config = {k: v for k, v in run["config"].items() if not k.startswith("_")}
    assert "cfg" not in config and config["world_size"] == 1
    assert config["model"]["arch"] == "vitt" and config["registers"] == 4
    assert run["alerts"] == [{"title": "artifacts", "text": "step 1: layer 6", "level": "WARN"}]

"""The telemetry callback inside real pretraining runs: cadence, files, loggers, resume."""

from __future__ import annotations

import csv

import pytest
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from vitreg.lit.pretrain import pretrain
from vitreg.lit.telemetry import telemetry_settings
from vitreg.telemetry.analyze import load_backbone
from vitreg.telemetry.measure import measure
from vitreg.telemetry.probe import load_probe
from vitreg.telemetry.store import read_maps, read_records


@pytest.mark.slow
def test_records_at_the_cadence_match_the_checkpoint_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    cfg = compose_config(
        [
            *TINY,
            "trainer.max_steps=4",
            "callbacks.checkpoint_every_n_steps=2",
            "callbacks.telemetry.every_n_steps=2",
            "callbacks.telemetry.models=[teacher,student]",
            "trainer.log_every_n_steps=1",
        ],
        run_dir=run,
    )
    summary = pretrain(cfg)
    assert summary["telemetry_seconds"] > 0
    records = read_records(run)
    assert [(r["step"], r["model"]) for r in records] == [(s, m) for s in (0, 2, 4) for m in ("student", "teacher")]
    assert all(r["resolution"] == 28 and r["num_registers"] == 4 and r["num_images"] == 8 for r in records)
    maps = read_maps(run, 4, "teacher", 28)
    assert maps["norm"].shape == (4, 2, 2) and maps["register_attention"].shape == (4, 4, 2, 2)

    # the teacher measured at step 4 is exactly the checkpoint's teacher at step 4
    probe = load_probe(run / "telemetry" / "probe_images.npz")
    assert probe.shape == (8, 3, 28, 28)
    loaded = load_backbone(run / "checkpoints" / "last.ckpt")
    assert loaded.step == 4
    again, _ = measure(loaded.model, probe, 28, telemetry_settings(cfg.callbacks.telemetry))
    last = [r for r in records if r["model"] == "teacher"][-1]
    for q, values in last["norms"]["prenorm"]["patch"].items():
        assert again["norms"]["prenorm"]["patch"][q] == pytest.approx(values, rel=1e-5)

    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("telemetry/teacher/r28/last/patch_norm_p50")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert "telemetry/student/r28/layer12/outlier_frac" in rows[0]
    assert "telemetry/teacher/r28/registers/cosine_max" in rows[0]

    probe_bytes = (run / "telemetry" / "probe_images.npz").read_bytes()
    with open_dict(cfg):
        cfg.trainer.max_steps = 6
    pretrain(cfg)
    steps = sorted({r["step"] for r in read_records(run)})
    assert steps == [0, 2, 4, 6]
    assert (run / "telemetry" / "probe_images.npz").read_bytes() == probe_bytes  # the same images after resume


@pytest.mark.slow
def test_disabled_telemetry_writes_nothing(tmp_path):
    run = tmp_path / "run"
    pretrain(compose_config([*TINY, "trainer.max_steps=1", "callbacks.telemetry.enabled=false"], run_dir=run))
    assert not (run / "telemetry").exists()


def test_bad_telemetry_settings_fail_at_start_naming_the_key(tmp_path):
    from vitreg.config import ConfigError, validate_config

    for override, key in (
        ("callbacks.telemetry.models=[ema]", "callbacks.telemetry.models"),
        ("callbacks.telemetry.resolutions=[30]", "callbacks.telemetry.resolutions"),
        ("callbacks.telemetry.detector=otsu", "callbacks.telemetry.detector"),
        ("callbacks.telemetry.every_n_steps=0", "callbacks.telemetry.every_n_steps"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(compose_config([*TINY, override], run_dir=tmp_path))


@pytest.mark.slow
def test_offline_wandb_run_holds_telemetry_scalars_histograms_and_images(tmp_path, monkeypatch):
    from tests.wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = compose_config(
        [*TINY, "trainer.max_steps=3", "callbacks.telemetry.every_n_steps=2", "logger=wandb"], run_dir=run
    )
    pretrain(cfg)
    history = read_offline_run(run)["history"]
    prefix = "telemetry/teacher/r28"
    scalar_steps = [r["trainer/global_step"] for r in history if f"{prefix}/last/outlier_frac/valley" in r]
    assert scalar_steps == [0, 2, 3]
    media = [r for r in history if f"{prefix}/images/emergence" in r]
    assert [r["trainer/global_step"] for r in media] == [0, 2, 3]
    last = media[-1]
    hist = last[f"{prefix}/hist/patch_norm_prenorm"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 8 * 4  # 8 probe images x 4 patches
    for name in ("emergence", "attention_maps", "position_map", "norm_histograms"):
        image = last[f"{prefix}/images/{name}"]
        assert image["_type"] == "image-file" and image["width"] > 100
        assert (run / "wandb").exists()
    records = read_records(run)
    assert [r["step"] for r in records] == [0, 2, 3]  # the same measurements on disk

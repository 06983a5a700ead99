"""The telemetry callback inside real pretraining runs: cadence, files, loggers, resume."""

from __future__ import annotations

import csv

import pytest
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from vitreg.config import TelemetryConfig, to_dataclass
from vitreg.data.probe import load_probe
from vitreg.lit.pretrain import pretrain
from vitreg.models.load import load_backbone
from vitreg.telemetry.measure import measure
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
            # a low robust z-score flags patches of the random tiny model, so register neurons are found
            "callbacks.telemetry.detector=robust_z",
            "callbacks.telemetry.robust_z=0.5",
            "callbacks.telemetry.neuron_top_k=5",
        ],
        run_dir=run,
    )
    summary = pretrain(cfg)
    assert summary["telemetry_seconds"] > 0
    records = read_records(run)
    assert [(r["step"], r["model"]) for r in records] == [(s, m) for s in (0, 2, 4) for m in ("student", "teacher")]
    assert all(r["resolution"] == 28 and r["num_registers"] == 4 and r["num_images"] == 8 for r in records)
    for r in records:  # 12 blocks: outliers at block 10, neurons of blocks 0..8, overlap with the step before
        neurons = r["register_neurons"]
        assert (neurons["outlier_layer"], neurons["highest_layer"]) == (10, 8) and len(neurons["neurons"]) == 5
        assert all(0 <= n["layer"] <= 8 and n["ratio"] > 0 for n in neurons["neurons"])
        assert (neurons["overlap"] is None) == (r["step"] == 0)
    maps = read_maps(run, 4, "teacher", 28)
    assert maps["norm"].shape == (4, 2, 2) and maps["register_attention"].shape == (4, 4, 2, 2)

    # the teacher measured at step 4 is exactly the checkpoint's teacher at step 4
    probe = load_probe(run / "telemetry" / "probe_images.npz")
    assert probe.shape == (8, 3, 28, 28)
    loaded = load_backbone(run / "checkpoints" / "last.ckpt")
    assert loaded.step == 4
    again, _ = measure(loaded.model, probe, 28, to_dataclass(TelemetryConfig, cfg.callbacks.telemetry))
    last = [r for r in records if r["model"] == "teacher"][-1]
    for q, values in last["norms"]["prenorm"]["patch"].items():
        assert again["norms"]["prenorm"]["patch"][q] == pytest.approx(values, rel=1e-5)

    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("telemetry/teacher/r28/last/patch_norm_p50")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert "telemetry/student/r28/layer12/outlier_frac" in rows[0]
    assert "telemetry/teacher/r28/registers/cosine_max" in rows[0]
    assert rows[0]["telemetry/teacher/r28/register_neurons/top_ratio"]
    assert [bool(r["telemetry/teacher/r28/register_neurons/overlap"]) for r in rows] == [False, True, True]

    probe_bytes = (run / "telemetry" / "probe_images.npz").read_bytes()
    with open_dict(cfg):
        cfg.trainer.max_steps = 6
    pretrain(cfg)
    resumed = read_records(run)
    assert sorted({r["step"] for r in resumed}) == [0, 2, 4, 6]
    # the resumed process compares with the measurements before the resume, read back from telemetry.jsonl
    assert all(r["register_neurons"]["overlap"] is not None for r in resumed if r["step"] == 6)
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
    hist = last[f"{prefix}/hist/patch_log10_norm_prenorm"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 8 * 4  # 8 probe images x 4 patches
    for name in ("emergence", "attention_maps", "position_map", "norm_histograms"):
        image = last[f"{prefix}/images/{name}"]
        assert image["_type"] == "image-file" and image["width"] > 100
        assert (run / "wandb").exists()
    records = read_records(run)
    assert [r["step"] for r in records] == [0, 2, 3]  # the same measurements on disk


# -- W&B media and alerts, on a fake run that records its calls ----------------------------------------------
class FakeRun:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.alerts: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def alert(self, **kwargs) -> None:
        self.alerts.append(kwargs)


def fake_wandb_trainer():
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    class CapturingLogger(WandbLogger):
        def __init__(self) -> None:  # no wandb.init: the run is FakeRun
            self.run = FakeRun()

        @property
        def experiment(self):
            return self.run

    logger = CapturingLogger()
    return SimpleNamespace(loggers=[logger], is_global_zero=True, global_step=100), logger.run


@pytest.fixture(scope="module")
def planted_measurements():
    from tests.telemetry.planted import IMG, planted_vit, probe_images

    probe = probe_images(4)
    out = []
    for model in (planted_vit(4), planted_vit(4, patches=[0, 9, 27, 63], block=5)):
        record, maps = measure(model, probe, IMG)
        record.update(step=100, model="teacher", resolution=IMG)
        out.append((record, maps))
    return probe, out


def telemetry_callback(tmp_path, *overrides):
    from vitreg.lit.telemetry import ArtifactTelemetry

    return ArtifactTelemetry(compose_config([*TINY, *overrides], run_dir=tmp_path), tmp_path)


def test_default_media_are_labelled_figures_and_histograms_of_log10_norm(tmp_path, planted_measurements):
    import numpy as np

    probe, [(record, maps), _] = planted_measurements
    callback = telemetry_callback(tmp_path)
    assert callback.t.media_style == "figures"
    trainer, run = fake_wandb_trainer()
    callback.history = [record]
    callback._log_media(trainer, "p", record, maps, probe, 100)
    (row,) = run.rows
    assert not any(k.startswith("p/hist/patch_norm") for k in row)  # the old key, on log-spaced bins
    for stream in ("prenorm", "postnorm"):
        hist = row[f"p/hist/patch_log10_norm_{stream}"].to_json()
        bins = np.asarray(hist["bins"])
        np.testing.assert_allclose(bins, np.log10(record["histogram_edges"]))
        np.testing.assert_allclose(np.diff(bins), np.diff(bins)[0])  # equal widths on W&B's linear axis
        assert sum(hist["values"]) == 4 * 64
    assert "attention maps" in row["p/images/attention_maps"]._caption
    # a figure has axes and white margins; a tile of the same maps is smaller and its caption explains it
    tiles = telemetry_callback(tmp_path, "callbacks.telemetry.media_style=tiles")._pictures(
        record, maps, probe, [record]
    )
    figures = callback._pictures(record, maps, probe, [record])
    assert "columns:" in tiles["attention_maps"][1] and figures["attention_maps"][1] == "attention maps"


def test_media_style_is_validated_naming_the_key(tmp_path):
    from vitreg.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"callbacks\.telemetry\.media_style: must be one of \['figures', 'tiles'\]"):
        validate_config(compose_config([*TINY, "callbacks.telemetry.media_style=fast"], run_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"callbacks\.telemetry\.alert_outlier_fraction: must be in \(0, 1\]"):
        validate_config(compose_config([*TINY, "callbacks.telemetry.alert_outlier_fraction=0"], run_dir=tmp_path))
    validate_config(compose_config([*TINY, "callbacks.telemetry.alert_outlier_fraction=null"], run_dir=tmp_path))


def test_alerts_fire_once_per_condition_and_not_again_after_resume(tmp_path, planted_measurements, caplog):
    _, [(clean, _), (planted, _)] = planted_measurements
    callback = telemetry_callback(tmp_path)
    trainer, run = fake_wandb_trainer()
    with caplog.at_level("WARNING", logger="vitreg.lit.telemetry"):
        callback._alert(trainer, clean)
        assert run.alerts == [] and not caplog.records
        callback._alert(trainer, planted)
        callback._alert(trainer, {**planted, "step": 150})
    assert [a["title"] for a in run.alerts] == [
        "High-norm artifacts emerged (teacher/r112)",
        "Outlier fraction above 0.01 (teacher/r112)",
    ]
    assert all(a["level"] == "WARN" and "step 100" in a["text"] for a in run.alerts)
    assert len([r for r in caplog.records if "telemetry alert" in r.getMessage()]) == 2

    state = callback.state_dict()  # what the checkpoint holds
    resumed = telemetry_callback(tmp_path)
    resumed.load_state_dict(state)
    trainer, run = fake_wandb_trainer()
    resumed._alert(trainer, {**planted, "step": 200})
    assert run.alerts == []

    off = telemetry_callback(tmp_path, "callbacks.telemetry.alerts=false")
    trainer, run = fake_wandb_trainer()
    assert off.t.alerts is False  # measure_now skips _alert


@pytest.mark.slow
def test_alerts_are_kept_in_the_checkpoint_and_not_repeated_after_resume(tmp_path, caplog):
    """A cutoff below every norm makes every patch an outlier from layer 0: both alerts fire at step 0,
    the checkpoint holds them, and the resumed run (steps 2..4) sends none again."""
    import torch

    run = tmp_path / "run"
    cfg = compose_config(
        [
            *TINY,
            "trainer.max_steps=2",
            "callbacks.checkpoint_every_n_steps=2",
            "callbacks.telemetry.every_n_steps=1",
            "callbacks.telemetry.detector=fixed",
            "callbacks.telemetry.fixed_cutoff=1e-6",
        ],
        run_dir=run,
    )
    with caplog.at_level("WARNING", logger="vitreg.lit.telemetry"):
        pretrain(cfg)
        first = [r.getMessage() for r in caplog.records if "telemetry alert" in r.getMessage()]
        assert len(first) == 2 and "step 0:" in first[0] and "layer 0" in first[0]
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["ArtifactTelemetry"]
        assert state == {"alerts_fired": ["emergence/teacher/r28", "outlier_fraction/teacher/r28"]}
        caplog.clear()
        with open_dict(cfg):
            cfg.trainer.max_steps = 4
        pretrain(cfg)
        assert [r["step"] for r in read_records(run)][-1] == 4
        assert not [r for r in caplog.records if "telemetry alert" in r.getMessage()]


def test_neuron_overlap_compares_with_the_last_earlier_measurement_even_after_a_resume(tmp_path):
    """The previous top-k set is the last earlier record of telemetry.jsonl: a new callback (a resumed run)
    reads it back, and a step measured again after a resume compares with the measurement before it."""
    from tests.telemetry.planted import IMG, planted_vit, probe_images
    from vitreg.telemetry.store import TelemetryWriter

    probe = probe_images(4)
    here, _ = measure(planted_vit(0, patches=[3, 12, 40, 51], block=5), probe, IMG)
    moved, _ = measure(planted_vit(0, patches=[3, 12, 40, 51], block=4), probe, IMG)
    writer = TelemetryWriter(tmp_path / "telemetry")
    for step, record in ((0, here), (10, moved)):
        writer.write({**record, "step": step, "model": "teacher"})

    callback = telemetry_callback(tmp_path)  # as a resumed run starts: history from the file
    callback._ensure_probe()
    assert [r["step"] for r in callback.history] == [0, 10]

    def overlap(record: dict, step: int, model: str = "teacher") -> float | None:
        again = {**record, "step": step, "model": model, "register_neurons": dict(record["register_neurons"])}
        callback._neuron_overlap(again)
        return again["register_neurons"]["overlap"]

    top = {(n["layer"], n["neuron"]) for n in here["register_neurons"]["neurons"]}
    other = {(n["layer"], n["neuron"]) for n in moved["register_neurons"]["neurons"]}
    assert overlap(here, 20) == len(top & other) / 10 < 1.0  # step 20 follows step 10 (block 4 planted)
    assert overlap(here, 10) == 1.0  # step 10 measured again after a resume: compared with step 0
    assert overlap(here, 0) is None  # nothing before the first measurement
    assert overlap(here, 20, model="student") is None  # another model has its own sequence

"""logger=tensorboard (scalars and the telemetry's histograms and images) and logger=[a,b] combinations."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY, compose_config
from vitreg.config import ConfigError, active_loggers, validate_config
from vitreg.lit.tensorboard_logger import _histogram_stats


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ["csv"]),
        (["logger=tensorboard"], ["tensorboard"]),
        (["logger=[csv,wandb]"], ["csv", "wandb"]),
        (["logger=[csv,tensorboard,wandb]"], ["csv", "tensorboard", "wandb"]),
        (["logger=none"], []),
        (["logger=[csv,wandb]", "logger.kind=none"], []),  # kind, the older single switch, wins
        (["logger.kind=tensorboard"], ["tensorboard"]),
    ],
)
def test_logger_groups_combine(overrides, expected):
    cfg = compose_config([*TINY, *overrides])
    validate_config(cfg)
    assert active_loggers(cfg.logger) == expected


def test_a_missing_tensorboard_package_fails_at_start(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "tensorboard" in name else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger: logger=tensorboard needs the tensorboard package"):
        validate_config(compose_config([*TINY, "logger=tensorboard"]))


def test_histogram_stats_from_bins():
    stats = _histogram_stats(np.array([0, 2, 1, 0]), np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert (stats["min"], stats["max"], stats["num"]) == (1.0, 3.0, 3)
    assert stats["sum"] == pytest.approx(2 * 1.5 + 2.5) and stats["sum_squares"] == pytest.approx(2 * 1.5**2 + 2.5**2)
    assert stats["bucket_limits"] == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.slow
def test_a_run_writes_scalars_histograms_and_images_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vitreg.lit.pretrain import pretrain

    cfg = compose_config(
        [*TINY, "logger=[csv,tensorboard]", "trainer.max_steps=2", "trainer.log_every_n_steps=1"],
        run_dir=tmp_path / "run",
    )
    cfg.callbacks.telemetry.every_n_steps = 2
    cfg.callbacks.telemetry.attention = False  # the attention map is still drawn from the last block
    summary = pretrain(cfg)
    assert summary["logs"] == str(tmp_path / "run" / "logs")  # the CSV logger ran too
    assert (tmp_path / "run" / "logs" / "metrics.csv").exists()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "lr"} <= set(tags["scalars"])
    assert "telemetry/teacher/r28/emergence_layer/valley" in tags["scalars"]
    assert any(t.startswith("telemetry/teacher/r28/hist/") for t in tags["histograms"])
    images = [t for t in tags["images"] if t.startswith("telemetry/teacher/r28/images/")]
    assert {t.rsplit("/", 1)[1] for t in images} >= {"attention_maps", "position_map"}
    assert [e.step for e in events.Images(images[0])] == [0, 2]  # at every measurement


def test_a_resumed_run_purges_the_steps_it_logs_again(tmp_path):
    """Events from the resumed step on (logged before a crash) are dropped, as the CSV logger drops its rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vitreg.lit.tensorboard_logger import build_tensorboard_logger

    first = build_tensorboard_logger(tmp_path)
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.finalize("success")
    resumed = build_tensorboard_logger(tmp_path, resume_step=4)  # the checkpoint was at step 4
    for step in (4, 5):
        resumed.log_metrics({"train/loss": 10.0 + step}, step=step)
    resumed.finalize("success")
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]

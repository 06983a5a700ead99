"""Which telemetry records alert: the first emergence and the outlier fraction crossing a threshold."""

from __future__ import annotations

import pytest

from tests.telemetry.planted import IMG, planted_vit, probe_images
from vitreg.telemetry.alerts import due_alerts
from vitreg.telemetry.measure import measure


@pytest.fixture(scope="module")
def records():
    probe = probe_images(4)
    clean, _ = measure(planted_vit(4), probe, IMG)
    planted, _ = measure(planted_vit(4, patches=[0, 9, 27, 63], block=5), probe, IMG)  # 4 of 64 patches
    for r in (clean, planted):
        r.update(step=100, model="teacher", resolution=IMG)
    return clean, planted


def test_a_clean_record_alerts_nothing(records):
    clean, _ = records
    assert due_alerts(clean, 0.01) == []


def test_emergence_and_the_outlier_fraction_alert_once_each(records):
    _, planted = records
    alerts = due_alerts(planted, 0.01)
    assert [a.key for a in alerts] == ["emergence/teacher/r112", "outlier_fraction/teacher/r112"]
    assert "layer 6" in alerts[0].text and "step 100" in alerts[0].text and "valley" in alerts[0].text
    assert "6.25%" in alerts[1].text and "alert_outlier_fraction=0.01" in alerts[1].text
    assert due_alerts(planted, 0.01, {a.key for a in alerts}) == []  # already fired
    assert [a.key for a in due_alerts(planted, 0.1)] == ["emergence/teacher/r112"]  # 6.25 % < 10 %
    assert [a.key for a in due_alerts(planted, None)] == ["emergence/teacher/r112"]  # null: no fraction alert

"""The local telemetry files: readers' errors and the scalars handed to the loggers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.telemetry.planted import IMG, planted_vit, probe_images
from vitreg.telemetry.measure import measure
from vitreg.telemetry.store import NO_EMERGENCE, TelemetryWriter, read_maps, scalar_summary


@pytest.fixture(scope="module")
def clean_and_planted():
    """(record without artifacts, record with artifacts from layer 6 on), each with its maps."""
    probe = probe_images(4)
    return measure(planted_vit(4), probe, IMG), measure(planted_vit(4, patches=[0, 9, 27, 63], block=5), probe, IMG)


def test_emergence_layer_is_logged_as_minus_one_until_it_appears(clean_and_planted):
    (clean, _), (planted, _) = clean_and_planted
    assert clean["emergence_layer"]["valley"] is None  # the record keeps JSON's null
    before = scalar_summary(clean, "t")
    assert {d: before[f"t/emergence_layer/{d}"] for d in clean["emergence_layer"]} == dict.fromkeys(
        clean["emergence_layer"], NO_EMERGENCE
    )
    assert NO_EMERGENCE == -1.0
    assert scalar_summary(planted, "t")["t/emergence_layer/valley"] == 6.0


def test_missing_maps_name_the_steps_that_exist(clean_and_planted, tmp_path):
    (record, maps), _ = clean_and_planted
    writer = TelemetryWriter(tmp_path / "telemetry")
    for step in (0, 50, 100):
        writer.write({**record, "step": step, "model": "teacher", "resolution": IMG}, maps)
    got = read_maps(tmp_path, 50, "teacher", IMG)
    np.testing.assert_array_equal(got["norm"], maps["norm"])
    with pytest.raises(FileNotFoundError, match=r"no maps at step 300 .*steps with maps for it: \[0, 50, 100\]"):
        read_maps(tmp_path, 300, "teacher", IMG)
    with pytest.raises(FileNotFoundError, match=r"steps with maps for it: none; measured .*\('teacher', 112\)"):
        read_maps(tmp_path, 50, "student", IMG)
    with pytest.raises(FileNotFoundError, match="was telemetry enabled"):
        read_maps(tmp_path / "elsewhere", 0, "teacher", IMG)

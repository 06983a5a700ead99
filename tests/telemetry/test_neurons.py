"""The register-neuron telemetry statistic on ViTs with a known answer (tests/telemetry/planted.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.telemetry.planted import IMG, planted_vit, probe_images
from vitreg.data.probe import probe_tensor
from vitreg.eval.register_neurons import RegisterNeuronSettings, find_register_neurons
from vitreg.telemetry.measure import measure
from vitreg.telemetry.neurons import scored_images, top_k_overlap
from vitreg.telemetry.stats import TelemetrySettings
from vitreg.telemetry.store import scalar_summary

PATCHES = [3, 12, 40, 51]


@pytest.fixture(scope="module")
def probe():
    return probe_images(6)


@pytest.fixture(scope="module")
def planted(probe):
    """The record of planted_vit: FFN neuron 0 of block 5 writes the high norms on PATCHES."""
    record, _ = measure(planted_vit(0, patches=PATCHES, block=5), probe, IMG)
    return record


def keys(section: dict) -> list[tuple[int, int]]:
    return [(n["layer"], n["neuron"]) for n in section["neurons"]]


def test_the_planted_neuron_tops_the_ratio_ranking(planted):
    section = planted["register_neurons"]
    assert section["outlier_layer"] == 10 and section["highest_layer"] == 8  # 12 blocks: -2 and round(12*17/24)
    assert section["outlier_fraction"] == pytest.approx(len(PATCHES) / 64)
    assert section["images_with_outliers"] == 6
    assert len(section["neurons"]) == 10 and section["overlap"] is None  # measure alone has no previous
    assert section["images_scored"] == 6
    first, second = section["neurons"][:2]
    assert (first["layer"], first["neuron"]) == (5, 0)
    assert first["ratio"] > 1000 and first["ratio"] > 100 * second["ratio"]
    ratios = [n["ratio"] for n in section["neurons"]]
    assert ratios == sorted(ratios, reverse=True)


def test_telemetry_and_the_evaluation_score_alike(planted, probe):
    """One scoring core: with the same outliers (valley on patch norms; no registers), the same numbers."""
    model = planted_vit(0, patches=PATCHES, block=5)
    found = find_register_neurons(model, probe_tensor(probe, IMG), RegisterNeuronSettings(top_k=1))
    (best,) = found["neurons"]
    first = planted["register_neurons"]["neurons"][0]
    assert (best["layer"], best["neuron"]) == (first["layer"], first["neuron"])
    assert best["score"] == pytest.approx(first["score"], rel=1e-5)
    assert best["ratio"] == pytest.approx(first["ratio"], rel=1e-4)


def test_no_outliers_gives_an_empty_list_a_note_and_no_nan(probe):
    record, _ = measure(planted_vit(0), probe, IMG)
    section = record["register_neurons"]
    assert section["neurons"] == [] and section["images_with_outliers"] == 0 and section["overlap"] is None
    assert "no outlier patch at block 10" in section["note"]
    json.dumps(section, allow_nan=False)
    scalars = scalar_summary(record, "t")
    assert not any(k.startswith("t/register_neurons/") for k in scalars)
    assert all(math.isfinite(v) for v in scalars.values())


def test_overlap_is_one_for_the_same_model_and_counted_when_the_set_moves(planted, probe):
    again, _ = measure(planted_vit(0, patches=PATCHES, block=5), probe, IMG)
    assert top_k_overlap(again["register_neurons"]["neurons"], planted["register_neurons"]["neurons"]) == 1.0
    moved, _ = measure(planted_vit(0, patches=PATCHES, block=4), probe, IMG)
    assert keys(moved["register_neurons"])[0] == (4, 0)  # the planted neuron moved to block 4
    before, now = set(keys(planted["register_neurons"])), set(keys(moved["register_neurons"]))
    overlap = top_k_overlap(moved["register_neurons"]["neurons"], planted["register_neurons"]["neurons"])
    assert overlap == len(before & now) / 10 and overlap < 1.0
    assert top_k_overlap([], planted["register_neurons"]["neurons"]) is None
    assert top_k_overlap(planted["register_neurons"]["neurons"], None) is None


def test_scalars_name_the_best_neuron_and_the_overlap(planted):
    record = json.loads(json.dumps(planted))
    scalars = scalar_summary(record, "t")
    assert scalars["t/register_neurons/top_layer"] == 5.0
    assert scalars["t/register_neurons/top_ratio"] == pytest.approx(planted["register_neurons"]["neurons"][0]["ratio"])
    assert "t/register_neurons/overlap" not in scalars  # the first measurement has none
    record["register_neurons"]["overlap"] = 0.7
    assert scalar_summary(record, "t")["t/register_neurons/overlap"] == 0.7


def test_the_statistic_can_be_switched_off_and_its_settings_are_checked(probe):
    model = planted_vit(0, patches=PATCHES, block=5)
    record, _ = measure(model, probe[:2], IMG, TelemetrySettings(register_neurons=False))
    assert "register_neurons" not in record
    record, _ = measure(model, probe, IMG, TelemetrySettings(neuron_top_k=3, neuron_highest_layer=4))
    assert record["register_neurons"]["highest_layer"] == 4
    assert len(record["register_neurons"]["neurons"]) == 3 and keys(record["register_neurons"])[0] != (5, 0)
    with pytest.raises(ValueError, match=r"telemetry\.neuron_outlier_layer=12 is out of range .* use 0\.\.11"):
        measure(model, probe[:2], IMG, TelemetrySettings(neuron_outlier_layer=12))
    with pytest.raises(ValueError, match=r"telemetry\.neuron_highest_layer=-13 is out of range"):
        measure(model, probe[:2], IMG, TelemetrySettings(neuron_highest_layer=-13))
    with pytest.raises(ValueError, match=r"telemetry neuron_top_k must be an integer >= 1, got 0"):
        TelemetrySettings(neuron_top_k=0)


def test_the_extra_pass_scores_the_first_images_with_outliers(probe):
    has = torch.tensor([[False, False], [True, False], [False, True], [False, False], [True, True]])
    assert scored_images(has, 2).tolist() == [1, 2]
    assert scored_images(has, None).tolist() == [0, 1, 2, 3, 4]
    record, _ = measure(planted_vit(0, patches=PATCHES, block=5), probe, IMG, TelemetrySettings(neuron_num_images=2))
    section = record["register_neurons"]
    assert section["images_scored"] == 2 and section["images_with_outliers"] == 6
    assert keys(section)[0] == (5, 0)
    with pytest.raises(ValueError, match=r"telemetry neuron_num_images must be an integer >= 1 or null"):
        TelemetrySettings(neuron_num_images=0)


def test_the_outliers_are_those_at_the_named_blocks_output(probe):
    """planted_vit's high norms start at block 5's output (telemetry layer 6): block 4's output has none."""
    model = planted_vit(0, patches=PATCHES, block=5)
    before, _ = measure(model, probe[:3], IMG, TelemetrySettings(neuron_outlier_layer=4))
    assert before["register_neurons"]["neurons"] == [] and "block 4" in before["register_neurons"]["note"]
    at, _ = measure(model, probe[:3], IMG, TelemetrySettings(neuron_outlier_layer=5))
    assert at["register_neurons"]["outlier_fraction"] == pytest.approx(len(PATCHES) / 64)
    assert keys(at["register_neurons"])[0] == (5, 0)

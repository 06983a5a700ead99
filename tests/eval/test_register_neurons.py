"""Register-neuron detection (Jiang et al. 2025, Alg. 1) on models with a known answer."""

from __future__ import annotations

import pytest
import torch

from tests.telemetry.planted import IMG, planted_vit, probe_images
from vitreg.data.probe import probe_tensor
from vitreg.eval.register_neurons import RegisterNeuronSettings, find_register_neurons, highest_block

PLANTED_BLOCK = 5  # planted_vit: FFN neuron 0 of this block writes the high norms on the marked patches


def images(n: int = 6) -> torch.Tensor:
    return probe_tensor(probe_images(n), IMG)


@pytest.mark.parametrize("detector", ["valley", "robust_z"])
def test_the_planted_neuron_is_found_first(detector):
    model = planted_vit(0, patches=[3, 12, 40, 51], block=PLANTED_BLOCK)
    result = find_register_neurons(model, images(), RegisterNeuronSettings(detector=detector, top_k=5))
    assert result["outlier_fraction"] == pytest.approx(4 / 64)
    assert result["images_with_outliers"] == 6
    first, second = result["neurons"][:2]
    assert (first["layer"], first["neuron"]) == (PLANTED_BLOCK, 0)
    assert first["score"] > 5 * second["score"] and first["ratio"] > 100
    assert len(result["neurons"]) == 5


def test_the_sparsity_filter_keeps_the_planted_neuron():
    model = planted_vit(0, patches=[3, 12], block=PLANTED_BLOCK)
    result = find_register_neurons(model, images(4), RegisterNeuronSettings(sparse_only=True, top_k=3))
    assert (result["neurons"][0]["layer"], result["neurons"][0]["neuron"]) == (PLANTED_BLOCK, 0)


def test_no_outliers_no_neurons():
    result = find_register_neurons(planted_vit(0), images(4), RegisterNeuronSettings(detector="fixed"))
    assert result["neurons"] == [] and result["images_with_outliers"] == 0
    assert "no patch above the fixed threshold" in result["note"]


def test_the_search_depth_follows_the_paper_and_names_its_setting():
    model = planted_vit(0)  # 12 blocks: round(12 * 17 / 24) = 8
    assert highest_block(model, RegisterNeuronSettings()) == 8
    assert highest_block(model, RegisterNeuronSettings(highest_layer=-1)) == 11
    with pytest.raises(ValueError, match=r"register_neurons\.highest_layer=12 is out of range"):
        highest_block(model, RegisterNeuronSettings(highest_layer=12))
    with pytest.raises(ValueError, match=r"register_neurons\.detector must be one of"):
        RegisterNeuronSettings(detector="otsu")

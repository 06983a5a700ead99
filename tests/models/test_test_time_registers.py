"""Test-time registers: known answers on a ViT with a planted register neuron, the exact edit, export/load."""

from __future__ import annotations

import json

import pytest
import torch

from tests.telemetry.planted import planted_vit, probe_images
from vitreg.eval.register_neurons import RegisterNeuronSettings, find_register_neurons
from vitreg.eval.token_probes import outlier_threshold
from vitreg.models import TestTimeRegisters, TestTimeRegisterSettings, load_dinov2_backbone
from vitreg.models.export import export_backbone
from vitreg.models.test_time_registers import move_register_neurons

PLANTED_BLOCK = 5
MARKED = [3, 12, 40, 51]
CLS_COSINE = 0.99  # the stated tolerance: TTR keeps the final CLS this close (cosine) to the plain model's


def images(n: int = 8) -> torch.Tensor:
    return (probe_images(n).float() / 255 - 0.45) / 0.22


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def planted():
    return planted_vit(2, patches=MARKED, block=PLANTED_BLOCK)


def test_ttr_moves_the_planted_norms_into_the_extra_token(planted):
    x = images()
    neurons = find_register_neurons(planted, x, RegisterNeuronSettings(top_k=1))["neurons"]
    assert [(n["layer"], n["neuron"]) for n in neurons] == [(PLANTED_BLOCK, 0)]
    ttr = TestTimeRegisters.from_backbone(planted, neurons)
    before, after = planted.forward_features(x), ttr.forward_features(x)
    norms = planted.layout.patches(before["x_prenorm"]).norm(dim=-1)
    threshold = outlier_threshold(norms, "valley")
    assert bool((norms[:, MARKED] > threshold).all()) and int((norms > threshold).sum()) == len(MARKED) * len(x)
    patches_after = ttr.layout.patches(after["x_prenorm"]).norm(dim=-1)
    assert patches_after.max() < threshold  # no patch is an outlier any more
    extra = ttr.layout.registers(after["x_prenorm"])[:, -1].norm(dim=-1)
    assert extra.min() > threshold  # the norm went to the test-time register
    # the outputs keep their shapes: same patches, one more register, and a CLS that barely moves
    assert after["x_norm_patchtokens"].shape == before["x_norm_patchtokens"].shape
    assert after["x_norm_regtokens"].shape[1] == before["x_norm_regtokens"].shape[1] + 1
    cosine = torch.cosine_similarity(after["x_norm_clstoken"], before["x_norm_clstoken"], dim=-1)
    assert cosine.min() > CLS_COSINE


def test_without_register_neurons_ttr_is_the_backbone():
    plain = planted_vit(2)  # nothing planted
    x = images()
    found = find_register_neurons(plain, x, RegisterNeuronSettings(detector="fixed"))
    assert found["neurons"] == []
    ttr = TestTimeRegisters.from_backbone(plain, found["neurons"])
    assert ttr.num_test_time_registers == 0
    assert torch.equal(ttr.forward_features(x)["x_prenorm"], plain.forward_features(x)["x_prenorm"])


def test_the_backbone_is_shared_and_left_unchanged(planted):
    x = images(2)
    plain = planted.forward_features(x)["x_prenorm"]
    ttr = TestTimeRegisters.from_backbone(planted, [(PLANTED_BLOCK, 0)], TestTimeRegisterSettings(num_tokens=2))
    assert ttr.blocks[0].attn.qkv.weight.data_ptr() == planted.blocks[0].attn.qkv.weight.data_ptr()
    ttr.forward_features(x)
    assert torch.equal(planted.forward_features(x)["x_prenorm"], plain)  # no hook left on the backbone
    assert ttr.layout.num_registers == 4 and ttr.num_register_tokens == 2
    # every interface the evaluations use sees the extra tokens as registers
    (patches, _cls, registers), *_ = ttr.get_intermediate_layers(
        x, 1, return_class_token=True, return_register_tokens=True
    )
    assert patches.shape[1] == 64 and registers.shape[1] == 4
    assert torch.equal(ttr.forward_features([x, x])[1]["x_prenorm"], ttr.forward_features(x)["x_prenorm"])


def _hidden(values: list[list[float]]) -> torch.Tensor:  # one image, tokens x 2 neurons
    return torch.tensor([values])


@pytest.mark.parametrize(
    "patch_values, expected_patches",
    [
        ("zero", [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]),
        ("mean", [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]),
        ("only_outliers", [[-1.0, 1.0], [-1.0, 2.0], [-1.0, 3.0], [0.0, 4.0]]),  # mean 0, std 2: 3 is high
        ("same", [[-1.0, 1.0], [-1.0, 2.0], [-1.0, 3.0], [3.0, 4.0]]),
    ],
)
def test_the_edit_of_one_block_by_hand(patch_values, expected_patches):
    # tokens: CLS, one test-time register, four patches; neuron 0 is the register neuron, neuron 1 is not
    hidden = _hidden([[-5.0, 9.0], [0.5, 9.0], [-1.0, 1.0], [-1.0, 2.0], [-1.0, 3.0], [3.0, 4.0]])
    settings = TestTimeRegisterSettings(scale=2.0, patch_values=patch_values)
    out = move_register_neurons(hidden, [0], slice(1, 2), slice(2, None), settings)
    assert out[0, 0].tolist() == [-5.0, 9.0]  # CLS untouched
    assert out[0, 1].tolist() == [-10.0, 9.0]  # scale x the signed max over all tokens (-5 beats 3)
    assert out[0, 2:].tolist() == expected_patches
    assert hidden[0, 5, 0] == 3.0  # the input is not modified in place


def test_the_signed_max_is_shared_by_a_blocks_register_neurons():
    hidden = _hidden([[0.0, 0.0], [0.0, 0.0], [1.0, -7.0], [2.0, 0.0]])
    out = move_register_neurons(hidden, [0, 1], slice(1, 2), slice(2, None), TestTimeRegisterSettings())
    assert out[0, 1].tolist() == [-7.0, -7.0]


def test_settings_and_neurons_are_checked(planted):
    with pytest.raises(ValueError, match=r"ttr\.patch_values must be one of"):
        TestTimeRegisterSettings(patch_values="median")
    with pytest.raises(ValueError, match=r"ttr\.num_tokens"):
        TestTimeRegisterSettings(num_tokens=0)
    with pytest.raises(ValueError, match=r"\(layer 12, neuron 0\) does not exist"):
        TestTimeRegisters.from_backbone(planted, [(12, 0)])
    with pytest.raises(ValueError, match=r"\(layer 0, neuron 768\) does not exist"):
        TestTimeRegisters.from_backbone(planted, [(0, 768)])
    ttr = TestTimeRegisters.from_backbone(planted, [(PLANTED_BLOCK, 0)])
    with pytest.raises(ValueError, match="already has test-time registers"):
        TestTimeRegisters.from_backbone(ttr, [(PLANTED_BLOCK, 0)])


def test_an_export_records_the_neurons_and_loads_back_with_them(planted, tmp_path):
    settings = TestTimeRegisterSettings(num_tokens=2, scale=1.5, patch_values="mean")
    ttr = TestTimeRegisters.from_backbone(planted, [{"layer": PLANTED_BLOCK, "neuron": 0, "score": 9.0}], settings)
    result = export_backbone(ttr, "dinov2", tmp_path / "ttr.pth")
    record = json.loads((tmp_path / "vitreg_export.json").read_text())["ttr.pth"]
    assert record["test_time_registers"] == {
        "neurons": [[PLANTED_BLOCK, 0]],
        "num_tokens": 2,
        "scale": 1.5,
        "patch_values": "mean",
    }
    assert result.record["num_register_tokens"] == 2  # the trained ones: what the file holds
    again = load_dinov2_backbone(tmp_path / "ttr.pth")
    assert isinstance(again, TestTimeRegisters) and again.neurons == ttr.neurons and again.settings == settings
    x = images(2)
    assert torch.equal(again.forward_features(x)["x_prenorm"], ttr.forward_features(x)["x_prenorm"])
    plain = load_dinov2_backbone(tmp_path / "ttr.pth", test_time_registers=False)
    assert not isinstance(plain, TestTimeRegisters)
    assert torch.equal(plain.forward_features(x)["x_prenorm"], planted.forward_features(x)["x_prenorm"])
    hf = export_backbone(ttr, "hf", tmp_path / "hf")
    assert any("loads the plain backbone" in w for w in hf.warnings)

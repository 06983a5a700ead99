"""VisionTransformer.edit: block outputs and FFN neurons rewritten while the forward runs, and only then."""

from __future__ import annotations

import pytest
import torch

from tests.telemetry.planted import IMG, planted_vit, probe_images
from vitreg.models.vision_transformer import build_vit

PLANTED_BLOCK = 5  # planted_vit: FFN neuron 0 of this block writes the high norms on the marked patches
MARKED = [3, 12, 40, 51]


def images(n: int = 4) -> torch.Tensor:
    return (probe_images(n).float() / 255 - 0.45) / 0.22


def tiny(**kw):
    torch.manual_seed(0)
    return build_vit("vitt", num_register_tokens=2, patch_size=14, img_size=IMG, **kw).eval()


def test_identity_edits_change_nothing_and_removal_restores_the_model():
    model, x = tiny(), images()
    plain = model.forward_features(x)["x_prenorm"]
    with model.edit(outputs={0: lambda t: t, -1: lambda t: t}, neurons={3: lambda h: h}):
        assert torch.equal(model.forward_features(x)["x_prenorm"], plain)
    with model.edit(outputs={-1: torch.zeros_like}):
        assert model.forward_features(x)["x_prenorm"].abs().max() == 0
    assert torch.equal(model.forward_features(x)["x_prenorm"], plain)


def test_an_output_edit_is_what_the_next_block_reads():
    model, x = tiny(), images()
    layers = [layer.tokens for layer in model.iter_layers(x)]
    replacement = torch.randn_like(layers[3])
    with model.edit(outputs={2: lambda t: replacement}):
        edited = [layer.tokens for layer in model.iter_layers(x)]
    for i in range(3):
        assert torch.equal(edited[i], layers[i])
    assert torch.equal(edited[3], replacement)
    assert torch.allclose(edited[4], model.blocks[3](replacement), atol=0, rtol=0)


def test_zeroing_the_planted_neuron_removes_the_planted_outliers():
    model, x = planted_vit(0, patches=MARKED, block=PLANTED_BLOCK), images()
    norms = model.layout.patches(model.forward_features(x)["x_prenorm"]).norm(dim=-1)
    normal = [p for p in range(norms.shape[1]) if p not in MARKED]
    assert norms[:, MARKED].min() > 5 * norms[:, normal].max()

    def silence(hidden):
        hidden = hidden.clone()
        hidden[..., 0] = 0
        return hidden

    with model.edit(neurons={PLANTED_BLOCK: silence}):
        layer = model.forward_intermediates(x, [PLANTED_BLOCK], mlp=True)[PLANTED_BLOCK]
        edited = model.layout.patches(model.forward_features(x)["x_prenorm"]).norm(dim=-1)
    assert layer.mlp_hidden[..., 0].abs().max() == 0  # the recorded neurons are the edited ones
    assert edited[:, MARKED].max() < 2 * norms[:, normal].max()


def test_edits_refuse_what_they_cannot_edit_correctly():
    model, x = tiny(), images(2)
    with model.edit(outputs={1: lambda t: t}), pytest.raises(RuntimeError, match="one batch at a time"):
        model.forward_features([x, x])
    with model.edit(outputs={1: lambda t: t[:, 1:]}), pytest.raises(ValueError, match="edit of block 1 must return"):
        model.forward_features(x)
    with pytest.raises(ValueError, match="neurons=12 is out of range"):
        model.edit(neurons={12: lambda h: h})
    dropping = tiny(drop_path_rate=0.9).train()
    with dropping.edit(neurons={11: lambda h: h}), pytest.raises(RuntimeError, match=r"model\.eval"):
        dropping.forward_features(torch.cat([x] * 4))

"""Attention-bias sinks (``model.attn_bias=kv``): a learned key and value per layer and head that every
query can attend to, with no query of its own."""

from __future__ import annotations

import math

import pytest
import torch

from vitreg.models import build_vit, infer_vit_config, load_dinov2_backbone
from vitreg.models.attention import Attention, math_attention
from vitreg.models.checkpoint import export_dinov2_state_dict
from vitreg.models.export_hf import ExportError, hf_config
from vitreg.models.export_timm import timm_kwargs

DIM, HEADS = 48, 2


def sink_attention(backend: str = "math") -> tuple[Attention, Attention]:
    torch.manual_seed(0)
    with_sink = Attention(DIM, HEADS, backend=backend, attn_bias="kv")
    plain = Attention(DIM, HEADS, backend=backend)
    plain.load_state_dict({k: v for k, v in with_sink.state_dict().items() if "sink" not in k})
    return with_sink, plain


def test_a_zero_sink_only_renormalises_the_softmax():
    """Zero key: the sink's logit is 0, so it takes exp(0) / (Z + 1) of every query's mass; zero value: it adds
    nothing. Each head's output is the plain one scaled by 1 - p_sink, before the output projection."""
    with_sink, plain = sink_attention()
    x = torch.randn(3, 7, DIM)
    q, k, v = (t.transpose(1, 2) for t in plain._qkv(x))
    heads, plain_probs = math_attention(q, k, v)  # (B, H, N, d)
    probs, sink = with_sink.attention_probs(x)
    z = ((q @ k.transpose(-2, -1)) / math.sqrt(DIM // HEADS)).exp().sum(-1)  # the plain softmax's denominator
    torch.testing.assert_close(sink, 1 / (z + 1))  # exp(0) / (Z + 1)
    torch.testing.assert_close(probs, plain_probs * (1 - sink)[..., None])
    scaled = (heads * (1 - sink)[..., None]).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(with_sink(x), plain.proj(scaled))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_the_sink_takes_mass_and_gives_its_value(backend):
    with_sink, plain = sink_attention(backend)
    with torch.no_grad():
        with_sink.sink_key.fill_(30.0)  # a key every query prefers by far
        with_sink.sink_value.normal_()
    x = torch.randn(2, 5, DIM)
    probs, sink = with_sink.attention_probs(x)
    torch.testing.assert_close(probs.sum(-1) + sink, torch.ones(2, HEADS, 5))
    # wherever the sink takes (nearly) all the mass, the output is the projected sink value
    full = sink > 0.999
    assert full.any()
    expected = with_sink.proj(with_sink.sink_value.reshape(1, 1, DIM).expand(2, 5, DIM))
    out = with_sink(x)
    per_query = full.all(dim=1)  # (B, N): every head sinks
    torch.testing.assert_close(out[per_query], expected[per_query], atol=1e-3, rtol=1e-3)
    assert not torch.allclose(out, plain(x))


def sink_vit(backend: str):
    kwargs = {"embed_dim": DIM, "num_heads": HEADS, "depth": 2, "num_register_tokens": 2, "img_size": 28}
    return build_vit("vitt", **kwargs, attn_bias="kv", attn_backend=backend).eval()


def test_backends_and_the_packed_path_agree_with_a_sink():
    torch.manual_seed(0)
    sdpa, math = (sink_vit(backend) for backend in ("sdpa", "math"))
    for name, p in sdpa.named_parameters():
        if "sink" in name:
            p.data.normal_()
    math.load_state_dict(sdpa.state_dict())
    a, b = torch.randn(2, 3, 28, 28), torch.randn(3, 3, 14, 14)
    with torch.no_grad():
        ref = sdpa.forward_features(a)["x_prenorm"]
        torch.testing.assert_close(math.forward_features(a)["x_prenorm"], ref, atol=1e-5, rtol=1e-5)
        packed = sdpa.forward_features_list([a, b])
        torch.testing.assert_close(packed[0]["x_prenorm"], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[1]["x_prenorm"], sdpa.forward_features(b)["x_prenorm"], atol=1e-5, rtol=1e-5)
        layers = list(sdpa.iter_layers(a, attention=True))
    assert layers[0].sink_attention is None
    for layer in layers[1:]:
        torch.testing.assert_close(layer.attention.sum(-1) + layer.sink_attention, torch.ones(2, HEADS, 1 + 2 + 4))


def test_the_sinks_learn_and_travel_with_the_weights(tmp_path):
    torch.manual_seed(0)
    model = build_vit("vitt", embed_dim=DIM, num_heads=HEADS, depth=2, img_size=28, attn_bias="kv", drop_path_rate=0.2)
    outs = model.forward_features_list([torch.randn(2, 3, 28, 28), torch.randn(4, 3, 14, 14)])
    sum(o["x_norm_clstoken"].square().sum() for o in outs).backward()
    grads = [p.grad for n, p in model.named_parameters() if "sink" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
    # a state dict says by itself that the model has sinks, and how many heads (the sink keys are (H, d))
    state = model.state_dict()
    inferred = infer_vit_config(state)
    assert (inferred.attn_bias, inferred.num_heads, inferred.embed_dim) == ("kv", HEADS, DIM)
    torch.save(state, tmp_path / "backbone.pth")
    loaded = load_dinov2_backbone(tmp_path / "backbone.pth").eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_official_layouts_refuse_sinks_clearly():
    model = build_vit("vitt", embed_dim=DIM, num_heads=HEADS, depth=1, img_size=28, attn_bias="kv")
    with pytest.raises(ValueError, match=r"attention-bias sinks \(model.attn_bias=kv\).*vitreg.models.load_backbone"):
        export_dinov2_state_dict(model)
    with pytest.raises(ExportError, match=r"attention-bias sinks .* no HF equivalent"):
        hf_config(model.cfg)
    with pytest.raises(ExportError, match=r"attention-bias sinks .* no timm equivalent"):
        timm_kwargs(model.cfg)


def test_a_wrong_attn_bias_names_the_setting():
    with pytest.raises(ValueError, match=r"attn_bias.*must be one of \['none', 'kv'\]"):
        build_vit("vitt", attn_bias="qkv")

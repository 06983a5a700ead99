"""Attention kernels agree, and backend selection never crashes on a machine without xformers."""

from __future__ import annotations

import logging

import pytest
import torch

from vitreg.models import build_vit
from vitreg.models.attention import Attention, _log_choice, math_attention, resolve_backend, xformers_available


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto", "xformers"])
def test_backends_agree_with_math_on_cpu(backend):
    torch.manual_seed(0)
    reference = Attention(192, 3, backend="math")
    other = Attention(192, 3, backend=backend)
    other.load_state_dict(reference.state_dict())
    x = torch.randn(2, 21, 192)
    torch.testing.assert_close(other(x), reference(x), atol=1e-5, rtol=1e-5)


def test_math_attention_matches_formula():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    out, probs = math_attention(q, k, v)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(out, expected @ v)


def test_whole_model_agrees_across_backends():
    torch.manual_seed(0)
    sdpa = build_vit("vitt", depth=2, img_size=56, num_register_tokens=4, attn_backend="sdpa").eval()
    math = build_vit("vitt", depth=2, img_size=56, num_register_tokens=4, attn_backend="math").eval()
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(sdpa.forward_features(x)["x_prenorm"], math.forward_features(x)["x_prenorm"])


def test_grouped_attention_keeps_groups_apart():
    torch.manual_seed(0)
    attn = Attention(64, 2)
    a, b = torch.randn(2, 5, 64), torch.randn(3, 7, 64)
    packed = attn.forward_groups(torch.cat([a.reshape(-1, 64), b.reshape(-1, 64)]), [(2, 5), (3, 7)])
    torch.testing.assert_close(packed[:10].view(2, 5, 64), attn(a), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(packed[10:].view(3, 7, 64), attn(b), atol=1e-6, rtol=1e-5)


def test_auto_and_xformers_fall_back_to_sdpa_on_cpu(caplog):
    cpu = torch.device("cpu")
    _log_choice.cache_clear()
    assert resolve_backend("sdpa", cpu) == "sdpa"
    assert resolve_backend("math", cpu) == "math"
    with caplog.at_level(logging.INFO, logger="vitreg.models.attention"):
        assert resolve_backend("auto", cpu) == "sdpa"
        assert resolve_backend("xformers", cpu) == "sdpa"
        assert resolve_backend("xformers", cpu) == "sdpa"
    messages = [r.getMessage() for r in caplog.records]
    # logged once per choice, with the reason; an explicit xformers request that cannot run warns
    assert messages == [
        "attention backend 'auto' -> 'sdpa' (xformers has no kernels for cpu tensors)",
        "attention backend 'xformers' -> 'sdpa' (xformers has no kernels for cpu tensors)",
    ]
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]


@pytest.mark.skipif(xformers_available(), reason="checks the message shown when xformers is missing")
def test_missing_xformers_on_cuda_falls_back():
    assert resolve_backend("auto", torch.device("cuda")) == "sdpa"
    assert resolve_backend("xformers", torch.device("cuda")) == "sdpa"


def test_unknown_backend_is_rejected_with_choices():
    with pytest.raises(ValueError, match=r"attn_backend.*'auto', 'sdpa', 'xformers', 'math'.*'flash9'"):
        build_vit("vitt", attn_backend="flash9")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_agree(dtype):
    torch.manual_seed(0)
    backends = ["sdpa", "math"] + (["xformers"] if xformers_available() else [])
    layers = {b: Attention(1024, 16, backend=b).cuda().to(dtype) for b in backends}
    for layer in layers.values():
        layer.load_state_dict(layers["math"].state_dict())
    x = torch.randn(8, 261, 1024, device="cuda", dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for b in backends:
        torch.testing.assert_close(layers[b](x), layers["math"](x), atol=tol, rtol=tol)

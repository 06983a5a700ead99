"""DINOHead: DINOv2's parameter names, init, forward, and deepcopy (the teacher is a copy of the student)."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from vitreg.ssl.heads import DINOHead, WeightNormLinear


def head(**kw) -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(16, **{"out_dim": 40, "hidden_dim": 32, "bottleneck_dim": 8, **kw})


def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_state_dict_keys_and_shapes_match_dinov2():
    shapes = {k: tuple(v.shape) for k, v in head().state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (32, 16),
        "mlp.0.bias": (32,),
        "mlp.2.weight": (32, 32),
        "mlp.2.bias": (32,),
        "mlp.4.weight": (8, 32),
        "mlp.4.bias": (8,),
        "last_layer.weight_g": (40, 1),
        "last_layer.weight_v": (40, 8),
    }
    assert set(head(nlayers=1).state_dict()) == {"mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}
    assert set(head(nlayers=2).state_dict()) >= {"mlp.0.weight", "mlp.2.weight"}
    assert isinstance(head(nlayers=2).mlp[1], nn.GELU) and len(head(nlayers=4).mlp) == 7
    with pytest.raises(ValueError, match="nlayers"):
        head(nlayers=0)


def test_init_trunc_normal_mlp_default_linear_prototypes_and_unit_g():
    h = DINOHead(384, out_dim=4096, hidden_dim=512, bottleneck_dim=256)
    for name in ("0", "2", "4"):
        w, b = h.mlp.get_submodule(name).weight, h.mlp.get_submodule(name).bias
        assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
        assert torch.count_nonzero(b) == 0
    g, v = h.last_layer.weight_g, h.last_layer.weight_v
    assert g.requires_grad and torch.equal(g, torch.ones(4096, 1))
    # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in), not the MLP's 0.02
    bound = 1 / math.sqrt(256)
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound
    assert abs(v.std().item() - bound / math.sqrt(3)) < 0.002


def test_forward_matches_manual_float64():
    h = head()
    with torch.no_grad():
        h.last_layer.weight_g.uniform_(0.5, 2.0)  # g != 1 so its role in the weight is checked
    x = torch.randn(5, 16)
    p = {k: v.double().numpy() for k, v in h.state_dict().items()}
    y = x.double().numpy()
    for i in ("0", "2"):
        y = np_gelu(y @ p[f"mlp.{i}.weight"].T + p[f"mlp.{i}.bias"])
    y = y @ p["mlp.4.weight"].T + p["mlp.4.bias"]
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    v = p["last_layer.weight_v"]
    w = p["last_layer.weight_g"] * v / np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(h(x).detach().double().numpy(), y @ w.T, rtol=1e-5, atol=1e-6)


def test_state_dict_interchangeable_with_torch_weight_norm():
    """A head built like DINOv2's (torch.nn.utils.weight_norm) loads our weights strictly, and vice versa."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = nn.Module()
        ref.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
        ref.last_layer = nn.utils.weight_norm(nn.Linear(8, 40, bias=False))
    ours = head()
    with torch.no_grad():
        ours.last_layer.weight_g.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(4, 16)
    ref_out = ref.last_layer(nn.functional.normalize(ref.mlp(x), dim=-1))
    torch.testing.assert_close(ours(x), ref_out)
    ours2 = head()
    ours2.load_state_dict(ref.state_dict(), strict=True)
    torch.testing.assert_close(ours2(x), ref_out)


def test_deepcopy_gives_an_independent_working_copy():
    student = head()
    teacher = copy.deepcopy(student)
    x = torch.randn(3, 16)
    torch.testing.assert_close(teacher(x), student(x), rtol=0, atol=0)
    with torch.no_grad():
        teacher.last_layer.weight_v.mul_(-1)
    assert not torch.allclose(teacher(x), student(x))
    assert teacher.last_layer.weight_v.data_ptr() != student.last_layer.weight_v.data_ptr()


def test_gradients_reach_g_and_v():
    h = head()
    h(torch.randn(3, 16)).square().sum().backward()
    assert h.last_layer.weight_g.grad is not None and h.last_layer.weight_v.grad is not None
    assert h.last_layer.weight_v.grad.abs().sum() > 0


def test_fp16_uses_a_larger_normalisation_floor():
    """A tiny fp16 bottleneck vector is divided by max(||x||, 1e-6), not by its own norm."""
    h = head(nlayers=1, bottleneck_dim=4)
    with torch.no_grad():
        h.mlp.weight.zero_()
        h.mlp.bias.fill_(1e-7)  # ||x|| = 2e-7 < 1e-6
    h = h.half()
    b = h.mlp.bias.float()
    expected = (b / 1e-6) @ h.last_layer.weight.float().T
    out = h(torch.zeros(2, 16, dtype=torch.float16))
    assert out.dtype == torch.float16
    # loose: fp16 rounding; eps 1e-12 would give an output ~4x larger (b / ||b||)
    torch.testing.assert_close(out.float(), expected.expand(2, -1), rtol=2e-2, atol=1e-2)
    # fp32 keeps eps 1e-12: the same vector is normalised to unit length
    out32 = h.float()(torch.zeros(2, 16))
    torch.testing.assert_close(out32, ((b / b.norm()) @ h.last_layer.weight.T).expand(2, -1), rtol=1e-5, atol=1e-6)


def test_weight_norm_linear_repr_and_no_bias():
    layer = WeightNormLinear(3, 5)
    assert [n for n, _ in layer.named_parameters()] == ["weight_g", "weight_v"]
    assert "in_features=3, out_features=5" in repr(layer)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(5))

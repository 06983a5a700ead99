"""The backbone traces for torch.compile: no graph breaks in the packed multi-crop forward, and a block
compiled with ``fullgraph=True`` computes exactly what eager computes (CPU, fp32, eager-like backends)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo as dynamo

from vitreg.models import build_vit
from vitreg.models.attention import Attention, _log_choice, resolve_attention_kernels
from vitreg.models.block import Block

# The default training config's backbone options (auto kernel, uniform drop path 0.3, registers, LayerScale)
# on a tiny width and crop size: tracing depends on the structure, not on the width.
DEFAULT_LIKE = dict(
    embed_dim=48,
    num_heads=3,
    depth=12,
    img_size=28,
    num_register_tokens=4,
    drop_path_rate=0.3,
    attn_backend="auto",
)


def multicrop_batch(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global crops (2B, 3, 28, 28) with iBOT masks, local crops (4B, 3, 14, 14), as the objective gets them."""
    torch.manual_seed(1)
    global_crops, local_crops = torch.randn(2 * batch, 3, 28, 28), torch.randn(4 * batch, 3, 14, 14)
    masks = torch.rand(2 * batch, 4) < 0.5
    return global_crops, local_crops, masks


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def test_packed_multicrop_forward_of_the_student_has_no_graph_breaks():
    student = build_vit("vitt", **DEFAULT_LIKE).train()
    global_crops, local_crops, masks = multicrop_batch()
    explained = dynamo.explain(student.forward_features)([global_crops, local_crops], masks=[masks, None])
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_teacher_forward_of_global_crops_has_no_graph_breaks():
    teacher = build_vit("vitt", **{**DEFAULT_LIKE, "drop_path_rate": 0.0}).eval()
    global_crops, _, _ = multicrop_batch()
    with torch.no_grad():
        explained = dynamo.explain(teacher.forward_features)(global_crops)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


def _block_io(packed: bool) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
    torch.manual_seed(2)
    if packed:  # two groups of different token counts, as global + local crops
        groups = [(4, 9), (6, 5)]
        return torch.randn(sum(b * n for b, n in groups), 48), groups
    return torch.randn(4, 9, 48), None


@pytest.mark.parametrize("packed", [True, False], ids=["forward_groups", "plain"])
@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_a_block_compiles_fullgraph_and_equals_eager(packed, drop_path):
    torch.manual_seed(0)
    eager = Block(48, 3, "mlp", 96, layerscale_init=0.5, drop_path=drop_path, attn_backend="auto").train()
    compiled = Block(48, 3, "mlp", 96, layerscale_init=0.5, drop_path=drop_path, attn_backend="auto").train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend="aot_eager", fullgraph=True, dynamic=False)

    results = []
    for blk in (eager, compiled):
        x, groups = _block_io(packed)
        x.requires_grad_(True)
        torch.manual_seed(3)  # the same stochastic-depth subsets in both
        out = blk(x, groups) if groups else blk(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, {k: p.grad for k, p in blk.named_parameters()}))
    (out_e, dx_e, grads_e), (out_c, dx_c, grads_c) = results
    assert torch.equal(out_c, out_e)
    assert torch.equal(dx_c, dx_e)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        assert torch.equal(grads_c[name], grads_e[name]), name
    # compiling in place keeps the parameter names (checkpoints, EMA, param groups, FSDP2)
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_kernels_are_resolved_and_logged_once_outside_the_traced_region(caplog):
    model = build_vit("vitt", depth=2, img_size=28, attn_backend="auto")
    _log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="vitreg.models.attention"):
        resolve_attention_kernels(model, torch.device("cpu"))
        resolve_attention_kernels(model, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert [layer.kernels for layer in layers] == [{"cpu": "sdpa"}] * 2
    assert [r.getMessage() for r in caplog.records] == [
        "attention backend 'auto' -> 'sdpa' (xformers has no kernels for cpu tensors)"
    ]


def test_an_unresolved_layer_resolves_on_its_first_eager_call():
    attn = Attention(48, 3, backend="auto")
    assert attn.kernels == {}
    attn(torch.randn(2, 5, 48))
    assert attn.kernels == {"cpu": "sdpa"}

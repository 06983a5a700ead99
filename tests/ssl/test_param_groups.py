"""Parameter groups: per-name lr / wd multipliers written out from DINOv2's rules, and their use in AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitreg.models import build_vit
from vitreg.ssl.param_groups import apply_schedules, layer_id, param_groups

DECAY, PE_MULT, DEPTH = 0.9, 0.2, 4


class FakeHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 8))
        self.last_layer = nn.Module()
        self.last_layer.weight_g = nn.Parameter(torch.ones(5, 1))
        self.last_layer.weight_v = nn.Parameter(torch.randn(5, 8))


def student() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"backbone": build_vit("vitt", depth=DEPTH, num_register_tokens=4), "dino_head": FakeHead()}


def expected() -> dict[str, tuple[float, float, bool]]:
    """name -> (lr_multiplier, wd_multiplier, is_last_layer), from the rules with decay 0.9, depth 4, mult 0.2."""
    want = {
        "backbone.cls_token": (0.9**5, 1.0, False),
        "backbone.pos_embed": (0.9**5, 1.0, False),
        "backbone.register_tokens": (0.9**5, 1.0, False),
        "backbone.mask_token": (0.9**5, 1.0, False),
        "backbone.patch_embed.proj.weight": (0.9**5 * 0.2, 1.0, False),
        "backbone.patch_embed.proj.bias": (0.9**5 * 0.2, 0.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "backbone.norm.bias": (1.0, 0.0, False),
        # heads: DINOv2 calls the grouping per submodule, and a head has no blocks: decay ** (0 + 1 - 1) = 1
        "dino_head.mlp.0.weight": (1.0, 1.0, False),
        "dino_head.mlp.0.bias": (1.0, 0.0, False),
        "dino_head.last_layer.weight_g": (1.0, 1.0, True),
        "dino_head.last_layer.weight_v": (1.0, 1.0, True),
    }
    block_wd = {
        "norm1.weight": 0.0,
        "norm1.bias": 0.0,
        "attn.qkv.weight": 1.0,
        "attn.qkv.bias": 0.0,
        "attn.proj.weight": 1.0,
        "attn.proj.bias": 0.0,
        "ls1.gamma": 0.0,
        "norm2.weight": 0.0,
        "norm2.bias": 0.0,
        "mlp.fc1.weight": 1.0,
        "mlp.fc1.bias": 0.0,
        "mlp.fc2.weight": 1.0,
        "mlp.fc2.bias": 0.0,
        "ls2.gamma": 0.0,
    }
    for i, lr_mult in enumerate([0.9**4, 0.9**3, 0.9**2, 0.9**1]):  # block i is layer i+1: 0.9 ** (4 + 1 - (i + 1))
        for suffix, wd in block_wd.items():
            want[f"backbone.blocks.{i}.{suffix}"] = (lr_mult, wd, False)
    return want


def per_name(groups: list[dict]) -> dict[str, tuple[float, float, bool]]:
    out = {}
    for g in groups:
        assert len(g["params"]) == len(g["names"])
        for name in g["names"]:
            assert name not in out, f"{name} is in two groups"
            out[name] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
    return out


def test_layer_id_rules():
    assert [layer_id(n, 4) for n in ("cls_token", "pos_embed", "register_tokens", "mask_token")] == [0, 0, 0, 0]
    assert layer_id("backbone.patch_embed.proj.weight", 4) == 0
    assert layer_id("blocks.0.attn.qkv.weight", 4) == 1
    assert layer_id("backbone.blocks.3.mlp.fc1.weight", 4) == 4
    assert layer_id("blocks.1.6.attn.qkv.weight", 12) == 7  # chunked: blocks.<chunk>.<global index>
    assert layer_id("backbone.blocks.2.11.ls1.gamma", 12) == 12
    assert layer_id("norm.weight", 4) == 5
    assert layer_id("dino_head.mlp.0.weight", 4) == 5


def test_multipliers_per_parameter_name():
    modules = student()
    groups = param_groups(modules, layerwise_decay=DECAY, patch_embed_lr_mult=PE_MULT)
    want = expected()
    got = per_name(groups)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == value, name
    # spot checks straight from the brief
    assert got["backbone.blocks.0.attn.qkv.weight"][0] == 0.9**4
    assert got["backbone.blocks.2.ls1.gamma"][1] == 0.0
    # fused: one group per distinct key, holding exactly the named tensors
    assert len(groups) == len(set(want.values()))
    params = {f"{k}.{n}": p for k, m in modules.items() for n, p in m.named_parameters()}
    for g in groups:
        assert all(p is params[n] for p, n in zip(g["params"], g["names"], strict=True))


def test_module_dict_student_module_and_bare_backbone_agree():
    modules = student()

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.dino_head = modules["backbone"], modules["dino_head"]

    want = per_name(param_groups(modules, DECAY, PE_MULT))
    assert per_name(param_groups(nn.ModuleDict(modules), DECAY, PE_MULT)) == want
    assert per_name(param_groups(Student(), DECAY, PE_MULT)) == want
    bare = per_name(param_groups(modules["backbone"], DECAY, PE_MULT))
    assert bare == {n.removeprefix("backbone."): v for n, v in want.items() if n.startswith("backbone.")}


def test_no_layerwise_decay_leaves_only_the_patch_embed_multiplier():
    got = per_name(param_groups(student(), layerwise_decay=1.0, patch_embed_lr_mult=PE_MULT))
    for name, (lr_mult, _, _) in got.items():
        assert lr_mult == (0.2 if "patch_embed" in name else 1.0), name


def test_frozen_parameters_are_skipped_and_a_backbone_is_required():
    modules = student()
    modules["backbone"].mask_token.requires_grad_(False)
    got = per_name(param_groups(modules, DECAY, PE_MULT))
    assert "backbone.mask_token" not in got and "backbone.cls_token" in got
    with pytest.raises(ValueError, match="backbone"):
        param_groups({"dino_head": FakeHead()}, DECAY, PE_MULT)


def test_apply_schedules_on_adamw():
    modules = student()
    groups = param_groups(modules, DECAY, PE_MULT)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    lr, wd, last_layer_lr = 1e-3, 0.05, 0.0
    apply_schedules(opt, lr=lr, wd=wd, last_layer_lr=last_layer_lr)
    want = expected()
    for g in opt.param_groups:
        for name in g["names"]:
            lr_mult, wd_mult, is_last = want[name]
            assert g["lr"] == (last_layer_lr if is_last else lr) * lr_mult, name
            assert g["weight_decay"] == wd * wd_mult, name

    # a step with the last layer frozen (lr 0) moves everything else and leaves the last layer untouched
    head = modules["dino_head"]
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    for m in modules.values():
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(head.last_layer.weight_g, before["last_layer.weight_g"])
    assert torch.equal(head.last_layer.weight_v, before["last_layer.weight_v"])
    assert not torch.equal(head.mlp[0].weight, before["mlp.0.weight"])

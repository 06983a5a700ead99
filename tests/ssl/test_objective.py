"""The composed DINOv2 objective on a real collated batch: who sees what, and what gets gradients."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, compose_config
from vitreg.data.synthetic import SyntheticShapes
from vitreg.lit.data import multicrop_collator, multicrop_transform
from vitreg.lit.module import build_objective


def make_batch(cfg, n: int = 4) -> dict:
    torch.manual_seed(0)
    data = SyntheticShapes(n, 32, 10, seed=0, transform=multicrop_transform(cfg))
    return multicrop_collator(cfg)([data[i] for i in range(n)])


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["ssl.centering=sinkhorn_knopp"],
        ["ssl.ibot.separate_head=true"],
        ["ssl.ibot.loss_weight=0"],
        ["augment.local_crops_number=0"],
        ["registers=0"],
    ],
)
def test_losses_are_finite_and_only_the_student_learns(extra):
    cfg = compose_config(TINY + extra)
    objective = build_objective(cfg).train()
    batch = make_batch(cfg)
    terms = objective(batch, teacher_temp=0.04)
    assert set(objective.loss_term_names()) <= set(terms)
    assert torch.isfinite(terms["loss"])
    torch.testing.assert_close(terms["loss"], sum(terms[k] for k in objective.loss_term_names()))
    terms["loss"].backward()
    assert all(p.grad is None for p in objective.teacher.parameters())
    unused = ("last_layer",) + (() if objective.do_ibot else ("mask_token",))  # no masks without iBOT
    grads = [p.grad for n, p in objective.student.named_parameters() if not any(u in n for u in unused)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ("ibot_loss" in terms) == (cfg.ssl.ibot.loss_weight > 0)


def test_teacher_is_a_deep_copy_in_eval_mode_without_drop_path():
    cfg = compose_config([*TINY, "model.drop_path_rate=0.3"])
    objective = build_objective(cfg).train()
    assert objective.student.backbone.training and not objective.teacher.training
    assert all(blk.drop_path == 0.0 for blk in objective.teacher.backbone.blocks)
    assert all(blk.drop_path == 0.3 for blk in objective.student.backbone.blocks)
    assert not any(p.requires_grad for p in objective.teacher.parameters())
    for (name, s), (_, t) in zip(
        objective.student.named_parameters(), objective.teacher.named_parameters(), strict=True
    ):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr(), name


def test_teacher_sees_only_unmasked_global_crops_and_student_sees_masks():
    cfg = compose_config(TINY)
    objective = build_objective(cfg).train()
    batch = make_batch(cfg)
    seen = {}

    def spy(name, module):
        original = module.forward_features

        def wrapped(x, masks=None):
            seen[name] = (x, masks)
            return original(x, masks)

        module.forward_features = wrapped

    spy("teacher", objective.teacher.backbone)
    spy("student", objective.student.backbone)
    objective(batch, teacher_temp=0.04)
    teacher_x, teacher_masks = seen["teacher"]
    assert teacher_x is batch["global_crops"] and teacher_masks is None
    student_x, student_masks = seen["student"]
    assert student_x[0] is batch["global_crops"] and student_x[1] is batch["local_crops"]
    assert student_masks[0] is batch["masks"] and student_masks[1] is None


def test_centering_moves_after_each_step_and_registers_never_enter_a_loss():
    cfg = compose_config(TINY)
    objective = build_objective(cfg).train()
    batch = make_batch(cfg)
    assert torch.count_nonzero(objective.dino_center.center) == 0
    objective(batch, teacher_temp=0.04)
    assert torch.count_nonzero(objective.dino_center.center) > 0
    # registers act only through attention: the outputs at register positions never reach the heads
    reg_grads = []

    def keep_output_grad(module, inputs, output):
        output.register_hook(lambda g: reg_grads.append(g.clone()))

    objective.student.backbone.blocks[-1].register_forward_hook(keep_output_grad)
    terms = objective(batch, teacher_temp=0.04)
    terms["loss"].backward()
    g = reg_grads[0]  # gradient w.r.t. the packed output tokens of the last block
    n_global, tokens = batch["global_crops"].shape[0], 1 + 4 + (28 // 14) ** 2
    per_image = g[: n_global * tokens].view(n_global, tokens, -1)
    assert torch.count_nonzero(per_image[:, 1:5]) == 0 and torch.count_nonzero(per_image[:, 0]) > 0

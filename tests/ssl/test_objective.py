"""The composed DINOv2 objective on a real collated batch: who sees what, and what gets gradients."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, compose_config
from vitreg.data.synthetic import SyntheticShapes
from vitreg.lit.data import multicrop_collator, multicrop_transform
from vitreg.lit.module import build_objective
from vitreg.lit.strategies import ddp_find_unused_parameters


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
        ["ssl.ibot.loss_weight=0", "ssl.ibot.mask_when_off=false"],
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
    masked = objective.do_ibot or cfg.ssl.ibot.mask_when_off  # DINOv2 masks even without iBOT
    unused = ("last_layer",) + (() if masked else ("mask_token",))
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
    # the forward only stages the update: the module commits it once the step is accepted
    assert torch.count_nonzero(objective.dino_center.center) == 0
    objective.commit_centers()
    assert torch.count_nonzero(objective.dino_center.center) > 0
    assert torch.count_nonzero(objective.ibot_center.center) > 0
    before = objective.dino_center.center.clone()
    objective(batch, teacher_temp=0.04)
    objective.discard_centers()  # a skipped step
    assert torch.equal(objective.dino_center.center, before)
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


def spy_student_masks(objective) -> list:
    """Records the masks the student backbone receives."""
    seen = []
    original = objective.student.backbone.forward_features

    def wrapped(x, masks=None):
        seen.append(masks)
        return original(x, masks)

    objective.student.backbone.forward_features = wrapped
    return seen


# 56-px global crops: a 4x4 patch grid, big enough for BEiT block masks (a 2x2 grid gets none)
IBOT_OFF = [*TINY, "ssl.ibot.loss_weight=0", "augment.global_crops_size=56", "model.drop_path_rate=0"]


def test_ibot_off_still_masks_the_student_global_crops_by_default():
    """DINOv2's ssl_meta_arch passes masks=[masks, None] to the student whatever do_ibot says, so
    mask_token keeps learning through DINO and KoLeo."""
    cfg = compose_config(IBOT_OFF)
    assert cfg.ssl.ibot.mask_when_off
    objective = build_objective(cfg).train()
    batch = make_batch(cfg)
    assert batch["masks"].any()
    seen = spy_student_masks(objective)
    terms = objective(batch, teacher_temp=0.04)
    assert seen[0][0] is batch["masks"] and seen[0][1] is None
    assert "ibot_loss" not in terms and "ibot_head" not in objective.student
    terms["loss"].backward()
    assert torch.count_nonzero(objective.student.backbone.mask_token.grad) > 0
    no_grad = {n for n, p in objective.student.named_parameters() if p.grad is None}
    assert not no_grad and not ddp_find_unused_parameters(cfg)


def test_ibot_off_without_masks_when_switched_off():
    cfg = compose_config([*IBOT_OFF, "ssl.ibot.mask_when_off=false"])
    objective = build_objective(cfg).train()
    batch = make_batch(cfg)
    seen = spy_student_masks(objective)
    objective(batch, teacher_temp=0.04)["loss"].backward()
    assert seen[0] == [None, None]
    assert objective.student.backbone.mask_token.grad is None
    no_grad = {n for n, p in objective.student.named_parameters() if p.grad is None}
    assert no_grad == {"backbone.mask_token"} and ddp_find_unused_parameters(cfg)

"""EMA teacher update against an explicit float64 loop, and the shared-storage check."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from vitreg.ssl.ema import assert_no_shared_storage, ema_update_


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.BatchNorm1d(5), nn.Linear(5, 3, bias=False))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.data.normal_()
    student[2].running_mean.fill_(3.0)
    return teacher, student


@pytest.mark.parametrize("m", [0.992, 0.5, 0.0, 1.0])
def test_ema_matches_explicit_float64_loop(m):
    teacher, student = pair()
    t0 = {n: p.detach().double().numpy().copy() for n, p in teacher.named_parameters()}
    s0 = {n: p.detach().double().numpy().copy() for n, p in student.named_parameters()}
    ema_update_(teacher, student, m)
    for name, p in teacher.named_parameters():
        want = np.empty_like(t0[name])
        for idx in np.ndindex(want.shape):
            want[idx] = m * t0[name][idx] + (1.0 - m) * s0[name][idx]
        np.testing.assert_allclose(p.detach().double().numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())


def test_momentum_one_keeps_teacher_and_zero_copies_student_exactly():
    teacher, student = pair()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    ema_update_(teacher, student, 0.0)
    for (_, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters(), strict=True):
        assert torch.equal(t, s)


def test_buffers_are_not_averaged():
    teacher, student = pair()
    ema_update_(teacher, student, 0.0)
    assert torch.equal(teacher[2].running_mean, torch.zeros(5))
    assert torch.equal(student[2].running_mean, torch.full((5,), 3.0))


def test_mismatched_parameter_names_are_listed():
    teacher, student = pair()
    with pytest.raises(ValueError, match=r"only in teacher \['0.bias', '0.weight'.*only in student \[\]"):
        ema_update_(nn.Sequential(nn.Linear(6, 5), *teacher[1:]), nn.Sequential(nn.Identity(), *student[1:]), 0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_(teacher, student, 1.5)


def test_mixed_dtypes_are_updated_per_bucket():
    teacher, student = pair()
    teacher[3].double()
    student[3].double()
    t0 = teacher[3].weight.detach().clone()
    ema_update_(teacher, student, 0.25)
    assert teacher[3].weight.dtype == torch.float64
    torch.testing.assert_close(teacher[3].weight, 0.25 * t0 + 0.75 * student[3].weight, rtol=1e-12, atol=1e-12)


def test_no_shared_storage():
    teacher, student = pair()
    assert_no_shared_storage(teacher, student)
    assert_no_shared_storage(copy.deepcopy(student), student)
    teacher[1].weight = student[1].weight  # a shared parameter
    with pytest.raises(RuntimeError, match=r"1\.weight <-> 1\.weight"):
        assert_no_shared_storage(teacher, student)


def test_shared_buffer_and_view_are_detected():
    teacher, student = pair()
    teacher[2].running_var = student[2].running_var
    with pytest.raises(RuntimeError, match="running_var"):
        assert_no_shared_storage(teacher, student)
    teacher, student = pair()
    teacher[0].weight = nn.Parameter(student[0].weight.data[1:])  # a view into the student's storage
    with pytest.raises(RuntimeError, match="share storage"):
        assert_no_shared_storage(teacher, student)


def test_cached_update_is_bitwise_the_uncached_one_over_steps():
    from vitreg.ssl.ema import TeacherEMA

    teacher, student = pair()
    teacher_ref, student_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    ema = TeacherEMA(teacher, student)
    for step, m in enumerate([0.992, 0.5, 0.9999, 0.0, 1.0, 0.7]):
        for s in (student, student_ref):  # the student moves between updates, as after AdamW
            torch.manual_seed(step)
            for p in s.parameters():
                p.data.add_(torch.randn_like(p))
        ema(m)
        ema_update_(teacher_ref, student_ref, m)
        for (name, t), t_ref in zip(teacher.named_parameters(), teacher_ref.parameters(), strict=True):
            assert torch.equal(t, t_ref), (step, name)


def test_cached_lists_are_built_once_and_rebuilt_when_parameters_change(monkeypatch):
    import vitreg.ssl.ema as ema_module

    calls = []
    build = ema_module.matched_parameters
    monkeypatch.setattr(ema_module, "matched_parameters", lambda t, s: calls.append(1) or build(t, s))
    teacher, student = pair()
    ema = ema_module.TeacherEMA(teacher, student)
    for _ in range(3):
        ema(0.9)
    assert len(calls) == 1
    # parameters replaced (as FSDP2 sharding or load_state_dict(assign=True) do): the new ones are updated
    teacher.load_state_dict({k: v.clone() for k, v in teacher.state_dict().items()}, assign=True)
    t0 = teacher[0].weight.detach().clone()
    ema(0.0)
    assert (
        len(calls) == 2 and torch.equal(teacher[0].weight, student[0].weight) and not torch.equal(t0, student[0].weight)
    )
    # moved to another dtype (.data swapped in place): rebuilt into the float64 bucket
    teacher.double()
    student.double()
    ema(0.5)
    assert len(calls) == 3 and teacher[0].weight.dtype == torch.float64


def test_cached_update_checks_the_momentum():
    from vitreg.ssl.ema import TeacherEMA

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        TeacherEMA(*pair())(-0.1)

"""Schedules against DINOv2's array semantics, rebuilt here with numpy, and against the reference table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitreg.ssl.schedules import CosineSchedule, build_schedules, scaled_lr

E = 1250  # OFFICIAL_EPOCH_LENGTH


def reference_array(base, final, total, warmup=0, start=0.0, freeze=0) -> np.ndarray:
    """DINOv2's CosineScheduler.schedule, written from the formula."""
    n = total - warmup - freeze
    i = np.arange(n, dtype=np.float64)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate([np.zeros(freeze), np.linspace(start, base, warmup), cosine])


def at(array: np.ndarray, final: float, it: int) -> float:
    """CosineScheduler.__getitem__: past the end of the array the final value."""
    return final if it >= len(array) else float(array[it])


def close(got: float, want: float) -> bool:
    # a few ulps: numpy's vectorised cos and math.cos may differ in the last bit on some CPUs
    return got == pytest.approx(want, rel=1e-13, abs=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_value=0.5, final_value=0.01, total_iters=40, warmup_iters=7, start_warmup_value=0.1, freeze_iters=3),
        dict(base_value=0.04, final_value=0.4, total_iters=25),  # increasing, no warmup (weight decay)
        dict(base_value=2.0, final_value=1.0, total_iters=10, warmup_iters=1, start_warmup_value=-1.0),
        dict(base_value=0.07, final_value=0.07, total_iters=9, warmup_iters=9, start_warmup_value=0.04),
        dict(base_value=0.3, final_value=0.0, total_iters=12, warmup_iters=12, freeze_iters=0),
        dict(base_value=1.0, final_value=0.5, total_iters=6, freeze_iters=6),
        dict(base_value=1.0, final_value=0.5, total_iters=0),
    ],
)
def test_cosine_schedule_equals_dinov2_array_at_every_iteration(kwargs):
    sched = CosineSchedule(**kwargs)
    ref = reference_array(
        kwargs["base_value"],
        kwargs["final_value"],
        kwargs["total_iters"],
        kwargs.get("warmup_iters", 0),
        kwargs.get("start_warmup_value", 0.0),
        kwargs.get("freeze_iters", 0),
    )
    assert len(ref) == len(sched) == kwargs["total_iters"]
    for it in range(kwargs["total_iters"] + 5):
        assert close(sched(it), at(ref, kwargs["final_value"], it)), it
        assert sched[it] == sched(it)


def test_cosine_schedule_long_run_at_chosen_iterations():
    # vitl14: 625k iterations, 100k warmup
    base, final, total, warmup = 3.464e-4, 1e-6, 625 * 1000, 100 * 1000
    sched = CosineSchedule(base, final, total, warmup_iters=warmup)
    ref = reference_array(base, final, total, warmup)
    for it in (0, 1, 2, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 2, total - 1, total, 10**7):
        assert close(sched(it), at(ref, final, it)), it
    assert sched(0) == 0.0
    # linspace endpoint, then cos(0): the peak twice
    assert sched(warmup - 1) == base and sched(warmup) == pytest.approx(base, rel=1e-15)
    assert final < sched(total - 1) < final + 1e-12  # the cosine stops one step short of final...
    assert sched(total) == final  # ...and the final value only comes past the end


def test_cosine_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_iters"):
        CosineSchedule(1.0, 0.0, total_iters=10, warmup_iters=8, freeze_iters=3)
    with pytest.raises(ValueError, match=">= 0"):
        CosineSchedule(1.0, 0.0, total_iters=10)(-1)


def dinov2_kwargs(**overrides):
    """ssl_default_config.yaml values (optim / teacher)."""
    kwargs = dict(
        base_lr=scaled_lr(0.004, 2048),
        min_lr=1e-6,
        epochs=100,
        warmup_epochs=10,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.992,
        final_momentum_teacher=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
        freeze_last_layer_epochs=1,
        epoch_length=E,
    )
    kwargs.update(overrides)
    return kwargs


def test_vitl16_short_reference_values():
    s = build_schedules(**dinov2_kwargs())
    peak = 0.004 * math.sqrt(2)
    assert s.lr.base_value == pytest.approx(5.657e-3, abs=5e-7) and s.lr.base_value == pytest.approx(peak, rel=1e-15)
    assert s.total_iters == 125_000 and s.lr.warmup_iters == 12_500
    assert s.lr(12_499) == pytest.approx(peak, rel=1e-15) and s.lr(12_500) == pytest.approx(peak, rel=1e-15)
    assert s.lr(62_500) == pytest.approx(3.3200e-3, abs=5e-8)
    assert s.wd(62_500) == pytest.approx(0.22, rel=1e-12)
    assert s.momentum(62_500) == pytest.approx(0.996, rel=1e-12)
    # the cosine start is final + 0.5 (base - final) * 2, a rounding away from base (0.03999999999999998)
    assert s.wd(0) == pytest.approx(0.04, rel=1e-15) and s.momentum(0) == pytest.approx(0.992, rel=1e-15)
    assert s.lr(0) == 0.0
    assert s.wd(125_000) == 0.4 and s.momentum(125_000) == 1.0 and s.lr(125_000) == 1e-6
    assert s.at(62_500)["lr"] == s.lr(62_500) and set(s.at(0)) == {
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "last_layer_lr",
    }


def test_vitl14_reference_values():
    lr = scaled_lr(2e-4, 96 * 32)
    assert lr == pytest.approx(3.464e-4, abs=5e-8)
    s = build_schedules(**dinov2_kwargs(base_lr=lr, epochs=500, warmup_epochs=80, momentum_teacher=0.994))
    assert s.total_iters == 625_000 and s.lr.warmup_iters == 100_000
    assert s.lr(99_999) == lr and s.lr(100_000) == pytest.approx(lr, rel=1e-15)
    assert s.momentum(0) == pytest.approx(0.994, rel=1e-15)


def test_all_schedules_match_dinov2_arrays():
    kw = dinov2_kwargs()
    s = build_schedules(**kw)
    total = 100 * E
    refs = {
        "lr": (reference_array(kw["base_lr"], 1e-6, total, 10 * E, 0.0), 1e-6),
        "wd": (reference_array(0.04, 0.4, total), 0.4),
        "momentum": (reference_array(0.992, 1.0, total), 1.0),
    }
    last = reference_array(kw["base_lr"], 1e-6, total, 10 * E, 0.0)
    last[:E] = 0
    refs["last_layer_lr"] = (last, 1e-6)
    chosen = (0, 1, E - 1, E, E + 1, 10 * E - 1, 10 * E, 10 * E + 1, total // 2, total - 1, total, total + 7)
    for key, (ref, final) in refs.items():
        for it in chosen:
            assert close(getattr(s, key)(it), at(ref, final, it)), (key, it)


def test_teacher_temperature_warms_up_linearly_then_stays():
    s = build_schedules(**dinov2_kwargs())
    n = 30 * E
    assert n == 37_500
    ref = np.linspace(0.04, 0.07, n)  # DINOv2: warmup over the whole schedule, endpoint included
    for it in (0, 1, 2, n // 2, n - 2, n - 1, n, n + 1, 125_000, 10**6):
        want = 0.07 if it >= n else float(ref[it])
        assert close(s.teacher_temp(it), want), it
    assert s.teacher_temp(0) == 0.04 and s.teacher_temp(n - 1) == 0.07
    step = 0.03 / (n - 1)
    assert s.teacher_temp(1000) == pytest.approx(0.04 + 1000 * step, rel=1e-14)


def test_last_layer_lr_is_zero_for_the_first_epoch_then_follows_lr():
    s = build_schedules(**dinov2_kwargs())
    assert all(s.last_layer_lr(it) == 0.0 for it in (0, 1, 600, E - 1))
    for it in (E, E + 1, 50_000, 124_999, 125_000, 200_000):
        assert s.last_layer_lr(it) == s.lr(it) > 0


def test_frozen_last_layer_past_the_end_gives_final_value():
    # epochs=2, freeze 3: the whole array is zeroed, but indexing past it still gives min_lr
    s = build_schedules(**dinov2_kwargs(epochs=2, warmup_epochs=1, freeze_last_layer_epochs=3, epoch_length=4))
    assert [s.last_layer_lr(it) for it in range(10)] == [0.0] * 8 + [1e-6, 1e-6]


def test_fractional_epochs_must_give_whole_iterations():
    s = build_schedules(**dinov2_kwargs(epochs=2.5, warmup_epochs=0.5, epoch_length=4))
    assert s.total_iters == 10 and s.lr.warmup_iters == 2
    with pytest.raises(ValueError, match="whole number"):
        build_schedules(**dinov2_kwargs(epochs=0.3, epoch_length=4))


def test_scaled_lr_rules():
    assert scaled_lr(0.004, 1024) == 0.004
    assert scaled_lr(0.004, 4096) == pytest.approx(0.008, rel=1e-15)
    assert scaled_lr(0.004, 2048, rule="none") == 0.004
    with pytest.raises(ValueError, match=r"'linear'.*sqrt_wrt_1024.*none"):
        scaled_lr(0.004, 2048, rule="linear")

"""DINOv2's per-iteration schedules (lr, weight decay, teacher momentum and temperature) and lr scaling.

``CosineSchedule`` computes each value in closed form instead of materialising DINOv2's numpy array,
with the same float64 operations in the same order, so ``schedule(it)`` equals ``CosineScheduler[it]``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

SCALING_RULES: tuple[str, ...] = ("sqrt_wrt_1024", "none")


class CosineSchedule:
    """DINOv2's ``CosineScheduler``, indexed by iteration: ``schedule(it)`` or ``schedule[it]``.

    The value sequence is ``zeros(freeze_iters)``, then ``linspace(start_warmup_value, base_value,
    warmup_iters)`` (endpoint included, so the peak appears twice), then
    ``final + 0.5 (base - final) (1 + cos(pi i / n))`` for ``i < n = total - warmup - freeze``
    (it never quite reaches ``final``). Any ``it >= total_iters`` gives ``final_value``.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.start_warmup_value = float(start_warmup_value)
        self.total_iters = operator.index(total_iters)
        self.warmup_iters = operator.index(warmup_iters)
        self.freeze_iters = operator.index(freeze_iters)
        self.cosine_iters = self.total_iters - self.warmup_iters - self.freeze_iters
        if min(self.warmup_iters, self.freeze_iters, self.cosine_iters) < 0:
            raise ValueError(
                f"need 0 <= freeze_iters + warmup_iters <= total_iters, got freeze={self.freeze_iters}, "
                f"warmup={self.warmup_iters}, total={self.total_iters}"
            )
        if self.warmup_iters > 1:
            # numpy's linspace: start + i * ((stop - start) / (num - 1)), last element set to stop exactly
            self._warmup_step = (self.base_value - self.start_warmup_value) / (self.warmup_iters - 1)

    def __call__(self, it: int) -> float:
        it = operator.index(it)
        if it < 0:
            raise ValueError(f"iteration must be >= 0, got {it}")
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            if it == self.warmup_iters - 1:
                # linspace's endpoint; a single-sample linspace holds only its start
                return self.base_value if it > 0 else self.start_warmup_value
            return self.start_warmup_value + it * self._warmup_step
        it -= self.warmup_iters
        cosine = math.cos(math.pi * it / self.cosine_iters)
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1 + cosine)

    __getitem__ = __call__

    def __len__(self) -> int:
        return self.total_iters

    def __repr__(self) -> str:
        return (
            f"CosineSchedule(base={self.base_value}, final={self.final_value}, total={self.total_iters}, "
            f"warmup={self.warmup_iters}, start_warmup={self.start_warmup_value}, freeze={self.freeze_iters})"
        )


class FrozenPrefix:
    """``schedule`` with its first ``zero_iters`` values set to 0 (beyond ``total_iters`` it still gives final)."""

    def __init__(self, schedule: CosineSchedule, zero_iters: int) -> None:
        self.schedule = schedule
        self.zero_iters = operator.index(zero_iters)
        self.total_iters = schedule.total_iters
        self.final_value = schedule.final_value

    def __call__(self, it: int) -> float:
        it = operator.index(it)
        # DINOv2 zeroes a prefix of the array; indexing past the array still returns final_value
        if 0 <= it < min(self.zero_iters, self.total_iters):
            return 0.0
        return self.schedule(it)

    __getitem__ = __call__

    def __len__(self) -> int:
        return self.total_iters


@dataclass(frozen=True)
class Schedules:
    """The five per-iteration schedules of DINOv2's ``build_schedulers``; call each with the iteration."""

    lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    last_layer_lr: FrozenPrefix

    @property
    def total_iters(self) -> int:
        return self.lr.total_iters

    def at(self, it: int) -> dict[str, float]:
        """All five values at iteration ``it`` (for logging)."""
        return {
            "lr": self.lr(it),
            "wd": self.wd(it),
            "momentum": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
            "last_layer_lr": self.last_layer_lr(it),
        }


def epochs_to_iters(epochs: float, epoch_length: int) -> int:
    """``epochs * epoch_length`` as an int; refuses fractional results rather than rounding silently."""
    iters = epochs * epoch_length
    if iters != int(iters):
        raise ValueError(f"{epochs} epochs of {epoch_length} iterations is not a whole number of iterations")
    return int(iters)


def build_schedules(
    *,
    base_lr: float,
    min_lr: float,
    epochs: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: float,
    freeze_last_layer_epochs: float,
    epoch_length: int = 1250,
) -> Schedules:
    """DINOv2's schedules; ``base_lr`` is the already-scaled peak lr, ``epoch_length`` is OFFICIAL_EPOCH_LENGTH.

    An "epoch" is only a unit of ``epoch_length`` iterations; it has nothing to do with the dataset size.
    """
    total = epochs_to_iters(epochs, epoch_length)
    warmup = epochs_to_iters(warmup_epochs, epoch_length)
    temp_iters = epochs_to_iters(warmup_teacher_temp_epochs, epoch_length)
    lr = CosineSchedule(base_lr, min_lr, total, warmup_iters=warmup, start_warmup_value=0.0)
    return Schedules(
        lr=lr,
        wd=CosineSchedule(weight_decay, weight_decay_end, total),
        momentum=CosineSchedule(momentum_teacher, final_momentum_teacher, total),
        # as DINOv2: warmup over the whole (short) schedule, then final_value forever after
        teacher_temp=CosineSchedule(
            teacher_temp, teacher_temp, temp_iters, warmup_iters=temp_iters, start_warmup_value=warmup_teacher_temp
        ),
        last_layer_lr=FrozenPrefix(lr, epochs_to_iters(freeze_last_layer_epochs, epoch_length)),
    )


def scaled_lr(base_lr: float, global_batch: int, rule: str = "sqrt_wrt_1024") -> float:
    """The peak lr for ``global_batch``: ``base_lr * sqrt(global_batch / 1024)`` (DINOv2), or ``base_lr`` ("none")."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024.0)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; choices: {list(SCALING_RULES)}")

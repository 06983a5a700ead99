"""The EMA teacher update of DINOv2, and a check that the teacher really is a separate copy."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

Buckets = list[tuple[list[Tensor], list[Tensor]]]


def matched_parameters(teacher: nn.Module, student: nn.Module) -> Buckets:
    """Teacher and student parameters matched by name, as (teacher list, student list) per
    (device, dtype) bucket: the operands of one ``_foreach`` pair each."""
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        only_t, only_s = sorted(t_params.keys() - s_params.keys()), sorted(s_params.keys() - t_params.keys())
        raise ValueError(f"teacher and student parameters differ: only in teacher {only_t}, only in student {only_s}")
    buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for name, t in t_params.items():
        s = s_params[name]
        if t.shape != s.shape:
            raise ValueError(f"{name}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        ts, ss = buckets[(t.device, t.dtype, s.device, s.dtype)]
        ts.append(t)
        ss.append(s)
    return list(buckets.values())


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")


@torch.no_grad()
def _ema_buckets_(buckets: Buckets, momentum: float) -> None:
    for ts, ss in buckets:  # DINOv2's pair (a lerp would round differently)
        torch._foreach_mul_(ts, momentum)
        torch._foreach_add_(ts, ss, alpha=1.0 - momentum)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m θ_t + (1 - m) θ_s`` for every parameter, matched by name; buffers are left alone (as DINOv2).

    Runs after ``optimizer.step()`` with ``m = momentum_schedule(it)``. Uses one ``_foreach`` pair per
    (device, dtype) bucket, like DINOv2's update over the flat FSDP parameters. ``TeacherEMA`` does the
    same with the matched lists built once.
    """
    _check_momentum(momentum)
    _ema_buckets_(matched_parameters(teacher, student), momentum)


def _layout(module: nn.Module) -> tuple:
    """What changes when the parameters are replaced (FSDP2 sharding, ``load_state_dict(assign=True)``)
    or moved (``.to(device/dtype)`` swaps ``.data``): the first parameter's identity, device and dtype."""
    first = next(module.parameters(), None)
    return (id(first), getattr(first, "device", None), getattr(first, "dtype", None))


class TeacherEMA:
    """``ema_update_(teacher, student, m)`` with the matched parameter lists cached: built on the first
    update and again only when either module's parameters were replaced or moved (see ``_layout``),
    instead of two name dicts per step. Bitwise the same update."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        self.teacher, self.student = teacher, student
        self._buckets: Buckets = []
        self._built_for: tuple | None = None

    def buckets(self) -> Buckets:
        layout = (_layout(self.teacher), _layout(self.student))
        if layout != self._built_for:
            self._buckets, self._built_for = matched_parameters(self.teacher, self.student), layout
        return self._buckets

    @torch.no_grad()
    def __call__(self, momentum: float) -> None:
        _check_momentum(momentum)
        _ema_buckets_(self.buckets(), momentum)


def _storages(module: nn.Module) -> dict[tuple[torch.device, int], str]:
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    out = {}
    for name, tensor in tensors:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr != 0:  # empty and meta tensors have no memory to share
            out.setdefault((tensor.device, ptr), name)
    return out


def assert_no_shared_storage(a: nn.Module, b: nn.Module) -> None:
    """Raise RuntimeError if any parameter or buffer of ``a`` shares memory with one of ``b``.

    Guards against a teacher that aliases the student (e.g. built by reference instead of deep copy),
    which would make the EMA a no-op.
    """
    b_storages = _storages(b)
    shared = [f"{name} <-> {b_storages[key]}" for key, name in _storages(a).items() if key in b_storages]
    if shared:
        raise RuntimeError(f"{len(shared)} tensors share storage between the two modules: {shared}")

"""The EMA teacher update of DINOv2, and a check that the teacher really is a separate copy."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m θ_t + (1 - m) θ_s`` for every parameter, matched by name; buffers are left alone (as DINOv2).

    Runs after ``optimizer.step()`` with ``m = momentum_schedule(it)``. Uses one ``_foreach`` pair per
    (device, dtype) bucket, like DINOv2's update over the flat FSDP parameters.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
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
    for ts, ss in buckets.values():
        torch._foreach_mul_(ts, momentum)
        torch._foreach_add_(ts, ss, alpha=1.0 - momentum)


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

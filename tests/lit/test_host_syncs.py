"""Host-device syncs per training step, counted on the CPU.

A ``TorchFunctionMode`` records every call that would block the host on a CUDA tensor (``item``,
``bool``, ``float``, ``tolist``, ``nonzero``, ``.cpu()``, ...) and every tensor built from a Python value
straight onto a device (``torch.tensor(x, device=...)``: a blocking host-to-device copy). A tiny real
``pretrain`` run counts them per step; the data pipeline (everything inside the DataLoader's
``__next__``: decode, multi-crop, collate; loader workers are other processes anyway) and the batch's
own host-to-device copy (``transfer_batch_to_device``, non-blocking from pinned memory on CUDA) are
not counted. Checkpoint saves are off (they copy the state to the host by design)."""

from __future__ import annotations

import traceback
from collections import defaultdict

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data.dataloader import _BaseDataLoaderIter

from tests.conftest import TINY, compose_config
from vitreg.lit.module import DINOv2Module

# Tensor methods and functions that wait for the device to hand a value (or a shape) to the host.
SYNCING = {
    "item", "tolist", "numpy", "cpu",
    "__bool__", "__float__", "__int__", "__index__", "__format__",
    "nonzero", "argwhere", "masked_select", "unique", "is_nonzero", "equal", "allclose",
}  # fmt: skip
# Factories that copy a Python value to the given device.
COPYING_FACTORIES = {"tensor", "as_tensor", "scalar_tensor"}


def _names_the_host(value) -> bool:
    # On the CPU the training device is torch.device("cpu") too: a move to it (the batch transfer,
    # clip_grad_norm_'s norms) is a same-device no-op on CUDA. Only a literal "cpu" means the host.
    return isinstance(value, str) and value.startswith("cpu")


def sync_kind(func, args, kwargs) -> str | None:
    """The name of the syncing call, or None when ``func`` does not sync the host."""
    name = getattr(func, "__name__", "")
    if name in SYNCING:
        return name
    if name == "to" and any(_names_the_host(v) for v in [*args[1:], kwargs.get("device")]):
        return "to(cpu)"
    if name in COPYING_FACTORIES and kwargs.get("device") is not None and not isinstance(args[0], torch.Tensor):
        return f"{name}(device=)"
    if name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
        return "boolean mask"
    return None


def _where(frame: traceback.FrameSummary) -> str:
    return f"{frame.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{frame.lineno} {frame.name}"


class HostSyncCounter(TorchFunctionMode):
    """Syncs per training step (``step`` is set by ``StepMarker``); paused while ``paused`` > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | str = "setup"
        self.paused = 0
        self.syncs: dict[int | str, list[str]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            kind = sync_kind(func, args, kwargs)
            caller = traceback.extract_stack()[-2]  # the frame that made the call
            # AdamW (foreach, not capturable) reads its step counts, kept on the CPU also with CUDA params
            if kind is not None and "/torch/optim/" not in caller.filename:
                self.syncs[self.step].append(f"{kind} at {_where(caller)}")
        return func(*args, **kwargs)


class StepMarker(L.Callback):
    """Attributes what follows a batch's start to that step (until the next batch starts)."""

    def __init__(self, counter: HostSyncCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.counter.step = trainer.global_step

    def on_train_end(self, trainer, module):
        self.counter.step = "teardown"


def _paused(counter: HostSyncCounter, fn):
    def wrapper(*args, **kwargs):
        counter.paused += 1
        try:
            return fn(*args, **kwargs)
        finally:
            counter.paused -= 1

    return wrapper


def count_syncs(monkeypatch, tmp_path, overrides: list[str], steps: int = 12, log_every: int = 5) -> dict:
    from vitreg.lit.pretrain import pretrain

    cfg = compose_config(
        [
            *TINY,
            f"trainer.max_steps={steps}",
            f"trainer.log_every_n_steps={log_every}",
            "callbacks.checkpoint_every_n_steps=1000",
            "callbacks.telemetry.enabled=false",
            "logger.kind=csv",
            *overrides,
        ],
        run_dir=tmp_path / "run",
    )
    counter = HostSyncCounter()
    monkeypatch.setattr(_BaseDataLoaderIter, "__next__", _paused(counter, _BaseDataLoaderIter.__next__))
    transfer = DINOv2Module.transfer_batch_to_device
    monkeypatch.setattr(DINOv2Module, "transfer_batch_to_device", _paused(counter, transfer))
    with counter:
        pretrain(cfg, extra_callbacks=[StepMarker(counter)])
    return counter.syncs


def report(syncs: dict, steps) -> str:
    return "\n".join(f"step {s}: {len(syncs[s])}\n  " + "\n  ".join(syncs[s]) for s in steps)


CASES = {
    "centering": [],
    "sinkhorn_knopp": ["ssl.centering=sinkhorn_knopp"],
    "skip": ["ssl.on_nonfinite=skip"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_at_most_one_host_sync_per_step(monkeypatch, tmp_path, case):
    steps, log_every = 12, 5
    syncs = count_syncs(monkeypatch, tmp_path, CASES[case], steps, log_every)
    # steps 1.. (step 0 builds the optimiser state) up to the last (which also holds the final checkpoint)
    middle = range(1, steps - 1)
    logging = [s for s in middle if (s + 1) % log_every == 0]
    quiet = [s for s in middle if s not in logging]
    print(report(syncs, middle))
    assert all(len(syncs[s]) <= 1 for s in quiet), report(syncs, quiet)
    # logging steps: besides the verdict, the loggers read each logged value once (Lightning's to_item),
    # and a few values logged as Python numbers (DataHealth's counts) are copied to the device
    for s in logging:
        others = [e for e in syncs[s] if "to_item" not in e]
        assert len(others) <= 3 and len(syncs[s]) <= 24, report(syncs, [s])

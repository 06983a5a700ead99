"""Pure bf16 compute with fp32 master weights in one process: ``trainer=fsdp`` with one device.

FSDP2's ``MixedPrecisionPolicy`` all-gathers the parameters in ``trainer.fsdp.param_dtype`` for compute
while the sharded fp32 parameters stay the optimiser's master weights; with one device there is nothing
to shard, so this is the pure-bf16 step of a single GPU (autocast, the ``trainer=gpu`` default, keeps the
residual stream, LayerScale and norms in fp32)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from tests.conftest import TINY, compose_config
from vitreg.lit.pretrain import pretrain


class BlockDtypes(L.Callback):
    """The dtype of what the student's first block receives, and of its weights, during training."""

    def __init__(self) -> None:
        self.inputs: set[torch.dtype] = set()

    def on_train_start(self, trainer, pl_module) -> None:
        block = pl_module.objective.student.backbone.blocks[0]
        block.register_forward_hook(lambda module, args, out: self.inputs.add(args[0].dtype))

    def on_train_end(self, trainer, pl_module) -> None:
        self.masters = {p.dtype for p in pl_module.objective.student.parameters()}


@pytest.fixture
def own_process_group():
    """The one-device FSDP2 run sets up a process group in this pytest process: tear it down after, so the
    multi-process tests that follow can make their own."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.usefixtures("own_process_group")
def test_one_device_fsdp_computes_in_bf16_and_keeps_fp32_master_weights(tmp_path):
    watch = BlockDtypes()
    cfg = compose_config([*TINY, "trainer=fsdp", "trainer.devices=1", "trainer.accelerator=cpu",
                          "trainer.max_steps=2"], run_dir=tmp_path / "run")  # fmt: skip
    summary = pretrain(cfg, extra_callbacks=[watch])
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert watch.inputs == {torch.bfloat16}
    assert watch.masters == {torch.float32}

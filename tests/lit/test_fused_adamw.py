"""``optim.fused``: which AdamW implementation the module builds, decided on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, compose_config
from vitreg.lit.module import DINOv2Module, use_fused_adamw

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("fused", "device", "precision", "expected"),
    [
        (None, CUDA, "bf16-mixed", True),  # null: fused with CUDA
        (None, CUDA, "32-true", True),
        (None, CUDA, None, True),
        (None, CPU, "32-true", False),  # the default foreach implementation on the CPU
        (None, CUDA, "16-mixed", False),  # Lightning would leave unscaling to the kernel, after our clipping
        (False, CUDA, "bf16-mixed", False),
        (True, CPU, "32-true", True),  # asked for: torch has a CPU kernel too
    ],
)
def test_fused_is_on_with_cuda_unless_switched_off(fused, device, precision, expected):
    assert use_fused_adamw(fused, device, precision, clip_grad=3.0) is expected


def test_fused_with_fp16_and_clipping_is_refused():
    with pytest.raises(ValueError, match=r"optim\.fused=true.*16-mixed.*clip"):
        use_fused_adamw(True, CUDA, "16-mixed", clip_grad=3.0)
    assert use_fused_adamw(True, CUDA, "16-mixed", clip_grad=0.0)


@pytest.mark.parametrize(("key", "fused"), [("null", False), ("true", True), ("false", False)])
def test_the_module_builds_the_chosen_adamw(key, fused):
    module = DINOv2Module(compose_config([*TINY, f"optim.fused={key}"]))  # on the CPU, no trainer
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults["fused"]) is fused

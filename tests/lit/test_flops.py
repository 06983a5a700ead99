"""FLOPs of one training step, counted on fake tensors (``vitreg.lit.flops``), and ``perf/mfu`` in a run."""

from __future__ import annotations

import csv

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import TINY, compose_config
from vitreg.lit.flops import cpu_flash_attention_formulas, flops_per_image, representative_batch, step_flops
from vitreg.lit.module import build_objective
from vitreg.lit.pretrain import pretrain


@pytest.mark.parametrize("extra", [[], ["model.drop_path_rate=0.4"], ["ssl.ibot.separate_head=true"]])
def test_fake_count_equals_the_count_of_a_real_step(extra):
    cfg = compose_config([*TINY, *extra])
    batch = representative_batch(cfg, cfg.data.batch_size_per_device, seed=3, device="cpu")
    batch = {k: torch.randn_like(v) if k.endswith("crops") and v is not None else v for k, v in batch.items()}
    objective = build_objective(cfg).train()
    with FlopCounterMode(display=False, custom_mapping=cpu_flash_attention_formulas()) as counter:
        objective(batch, teacher_temp=cfg.ssl.teacher.teacher_temp)["loss"].backward()
    assert step_flops(cfg, seed=3) == counter.get_total_flops() > 0


def test_drop_path_subsets_are_counted_as_computed():
    nominal = step_flops(compose_config([*TINY, "model.drop_path_rate=0.0"]))
    actual = step_flops(compose_config([*TINY, "model.drop_path_rate=0.4"]))
    assert 0.5 * nominal < actual < 0.9 * nominal


def test_counting_never_reads_the_pretrained_weights(tmp_path):
    cfg = compose_config([*TINY, f"model.pretrained_weights={tmp_path / 'absent.pth'}"])
    assert step_flops(cfg) == step_flops(compose_config(TINY))


@pytest.mark.slow
def test_mfu_reaches_the_csv_given_the_device_peak(tmp_path):
    cfg = compose_config([*TINY, "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.peak_tflops=0.5"],
                         run_dir=tmp_path / "run")  # fmt: skip
    summary = pretrain(cfg)
    with open(f"{summary['logs']}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/mfu")]
    assert rows
    per_image = flops_per_image(cfg)
    for r in rows:
        expected = float(r["perf/img_per_s_per_device"]) * per_image / 0.5e12
        assert float(r["perf/mfu"]) == pytest.approx(expected, rel=1e-6)

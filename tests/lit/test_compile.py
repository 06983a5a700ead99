"""``trainer.compile``: per-block torch.compile of student and teacher, applied from outside the model in
``configure_model``. CPU checks tracing and numbers (eager-like backends), never speed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo

from tests.conftest import TINY, compose_config
from tests.lit.test_module import fit as module_fit
from vitreg.config import to_dataclass
from vitreg.lit.compile import COMPILE_BACKEND_ENV, compile_blocks, compile_objective, compile_wanted, is_compiled
from vitreg.lit.module import DINOv2Module, build_objective
from vitreg.models import build_vit
from vitreg.models.config import ModelConfig


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiling raises dynamo's recompile limits for the run: give them back after each test."""
    limits = dynamo.config.recompile_limit, dynamo.config.accumulated_recompile_limit
    dynamo.reset()
    yield
    dynamo.reset()
    dynamo.config.recompile_limit, dynamo.config.accumulated_recompile_limit = limits


def blocks(module: DINOv2Module) -> list[torch.nn.Module]:
    return [*module.student.backbone.blocks, *module.teacher.backbone.blocks]


def fit(cfg, steps: int) -> DINOv2Module:
    torch.manual_seed(0)  # the same initial weights for the eager and the compiled run
    return module_fit(cfg, steps)[1]


def test_null_means_on_with_cuda_only():
    assert compile_wanted(None, torch.device("cuda", 0))
    assert not compile_wanted(None, torch.device("cpu"))
    assert compile_wanted(True, torch.device("cpu")) and not compile_wanted(False, torch.device("cuda"))


def test_default_config_packed_multicrop_forward_has_no_graph_breaks():
    # the default config (vitl's options: auto kernel, drop path 0.3, ...) at a tiny width, 12 blocks
    cfg = compose_config(["registers=4", "model.arch=vitt"])
    student = build_objective(cfg).student.backbone.train()
    size, local = cfg.augment.global_crops_size, cfg.augment.local_crops_size
    assert to_dataclass(ModelConfig, cfg.model).vit_config(size).attn_backend == "auto" and len(student.blocks) == 12
    global_crops, local_crops = torch.randn(4, 3, size, size), torch.randn(16, 3, local, local)
    masks = torch.rand(4, (size // 14) ** 2) < 0.3
    explained = dynamo.explain(student.forward_features)([global_crops, local_crops], masks=[masks, None])
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


def test_compiling_is_in_place_once_and_keeps_state_dict_keys():
    cfg = compose_config(TINY)
    objective = build_objective(cfg)
    keys = list(objective.state_dict())
    assert compile_objective(objective, True, torch.device("cpu"), backend="eager")
    assert all(is_compiled(b) for tree in (objective.student, objective.teacher) for b in tree.backbone.blocks)
    # padded iBOT (the default): static shapes, so the heads and the loss terms are compiled too
    heads = [m for tree in (objective.student, objective.teacher) for name, m in tree.items() if name != "backbone"]
    assert all(is_compiled(m) for m in [*heads, objective.losses])
    assert list(objective.state_dict()) == keys
    assert compile_blocks(objective.student.backbone, torch.device("cpu"), "eager") == 0  # already compiled


def test_unpadded_ibot_keeps_heads_and_losses_eager():
    objective = build_objective(compose_config([*TINY, "ssl.ibot.pad_masked_tokens=false"]))
    assert compile_objective(objective, True, torch.device("cpu"), backend="eager")
    heads = [m for name, m in objective.student.items() if name != "backbone"]
    assert not any(is_compiled(m) for m in [*heads, objective.losses])  # the masked count would recompile them


def test_padded_heads_and_losses_compile_whole_and_never_recompile_for_another_masked_count():
    from tests.ssl.test_objective import make_batch

    cfg = compose_config(TINY)
    objective = build_objective(cfg)
    counter = dynamo.testing.CompileCounter()  # fullgraph=True: a graph break would raise instead
    compile_objective(objective, True, torch.device("cpu"), backend=counter)
    batch = make_batch(cfg)
    objective(batch, teacher_temp=0.04)["loss"].backward()
    traced = counter.frame_count
    for drop in (1, 2):  # fewer masked tokens, the same upperbound
        fewer = {**batch, "mask_indices": batch["mask_indices"][:-drop], "masks_weight": batch["masks_weight"][:-drop]}
        objective(fewer, teacher_temp=0.04)["loss"].backward()
    assert counter.frame_count == traced


def test_per_block_drop_path_rates_compile_without_hitting_the_recompile_limit():
    # linearly spaced rates give every block its own graph; fullgraph=True turns dynamo's limit into an error
    model = build_vit("vitt", embed_dim=48, num_heads=3, img_size=28, drop_path_rate=0.3, drop_path_uniform=False)
    teacher = build_vit("vitt", embed_dim=48, num_heads=3, img_size=28)
    objective = torch.nn.Module()
    objective.student = torch.nn.ModuleDict({"backbone": model})
    objective.teacher = torch.nn.ModuleDict({"backbone": teacher})
    compile_objective(objective, True, torch.device("cpu"), backend="eager")
    model.train().forward_features([torch.randn(2, 3, 28, 28), torch.randn(4, 3, 14, 14)])


@pytest.mark.slow
def test_compiled_training_equals_eager_and_keeps_keys(monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")  # inductor by default; its CPU codegen is slow
    eager = fit(compose_config(TINY), steps=2)
    compiled = fit(compose_config([*TINY, "trainer.compile=true"]), steps=2)
    assert all(is_compiled(b) for b in blocks(compiled))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for name, value in eager.state_dict().items():
        assert torch.equal(compiled.state_dict()[name], value), name  # fp32 on CPU: bitwise the same


def test_null_on_cpu_compiles_nothing():
    module = fit(compose_config(TINY), steps=1)
    assert module.cfg.trainer.compile is None
    assert not any(is_compiled(b) for b in blocks(module))


FSDP_SCRIPT = """
import copy, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from tests.conftest import TINY, compose_config
from tests.ssl.test_objective import make_batch
from vitreg.lit.compile import compile_objective, is_compiled
from vitreg.lit.module import build_objective
from vitreg.lit.strategies import shard_objective

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
cfg = compose_config([*TINY, "trainer=fsdp", "trainer.fsdp.param_dtype=float32"])
torch.manual_seed(0)
eager = build_objective(cfg).train()
sharded = copy.deepcopy(eager)
keys = list(sharded.state_dict())
compile_objective(sharded, True, torch.device("cpu"), backend="aot_eager")
shard_objective(sharded, init_device_mesh("cpu", (1,)), cfg.trainer.fsdp)  # compile first, then shard
assert all(is_compiled(b) for b in sharded.student.backbone.blocks) and list(sharded.state_dict()) == keys
batch = make_batch(cfg)
for objective in (eager, sharded):
    torch.manual_seed(1)
    objective(batch, teacher_temp=0.04)["loss"].backward()
for (name, p), q in zip(eager.student.named_parameters(), sharded.student.parameters(), strict=True):
    assert torch.equal(p.grad, q.grad.full_tensor()), name
dist.destroy_process_group()
print("FSDP2 OK")
"""


@pytest.mark.slow
def test_compile_then_fsdp2_shard_trains_like_eager(tmp_path):
    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "fsdp_compile.py"
    script.write_text(FSDP_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, str(script), port], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "FSDP2 OK" in done.stdout, done.stderr[-3000:]

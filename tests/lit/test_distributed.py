"""trainer=ddp and trainer=fsdp (FSDP2) with two real CPU processes (torchrun, gloo).

Two processes with b images each must train exactly like one process with the 2b images of the same
global batch: same per-step losses (mean over ranks), same per-sub-module gradient norms, same final
student and teacher weights. KoLeo is computed per rank over the local batch (as in DINOv2), so it is
not split-invariant: the equality runs use koleo_loss_weight=0 and KoLeo only gets a smoke run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_config
from tests.lit import distributed_worker as worker
from vitreg.config import ConfigError, validate_config
from vitreg.lit.strategies import (
    FSDP2Strategy,
    VitregDDPStrategy,
    build_strategy,
    ddp_find_unused_parameters,
    sharded_checkpoint_problem,
)

REPO = Path(__file__).resolve().parents[2]
RTOL, ATOL = 1e-5, 1e-6
EQUALITY = worker.EQUALITY


@contextmanager
def one_thread():
    """These tiny models gain nothing from intra-op threads, and 2 threads on 2 cores that other
    processes also use (the torchrun workers, a parallel test run) make every op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# ------------------------------------------------------------------------------------------ fast checks
def test_strategy_selection():
    assert build_strategy(compose_config(TINY)) == "auto"
    ddp = build_strategy(compose_config([*TINY, "trainer=ddp"]))
    assert isinstance(ddp, VitregDDPStrategy)
    assert ddp._ddp_kwargs == {"find_unused_parameters": False, "static_graph": False, "gradient_as_bucket_view": True}
    assert ddp._ddp_comm_hook is None
    hooked = build_strategy(compose_config([*TINY, "trainer=ddp", "trainer.ddp.comm_hook=bf16"]))
    assert hooked._ddp_comm_hook.__name__ == "bf16_compress_hook"
    assert isinstance(build_strategy(compose_config([*TINY, "trainer=fsdp"])), FSDP2Strategy)
    cfg = compose_config([*TINY, "trainer=fsdp"])  # the group file, not the experiment's trainer=cpu
    assert (cfg.trainer.strategy, cfg.trainer.precision, cfg.trainer.fsdp.param_dtype) == (
        "fsdp",
        "32-true",
        "bfloat16",
    )


@pytest.mark.parametrize(
    ("overrides", "unused"),
    [
        ([], set()),
        (["ssl.ibot.separate_head=true"], set()),
        (["ssl.ibot.loss_weight=0"], set()),  # DINOv2 masks the student's crops even without iBOT
        (["ssl.ibot.loss_weight=0", "ssl.ibot.mask_when_off=false"], {"backbone.mask_token"}),
        (["ssl.dino.loss_weight=0", "ssl.ibot.separate_head=true"], "dino_head"),
    ],
)
def test_find_unused_parameters_matches_the_gradients(overrides, unused):
    """The automatic find_unused_parameters is true exactly when a backward leaves student
    parameters without gradient (then DDP with find_unused_parameters=false would fail)."""
    from vitreg.lit.module import DINOv2Module

    cfg = compose_config([*TINY, *overrides, "model.drop_path_rate=0"])
    module = DINOv2Module(cfg)
    batch = worker.make_global_batches(cfg, 1, 4, 1)[0]
    module.objective(batch, teacher_temp=0.04)["loss"].backward()
    no_grad = {n for n, p in module.student.named_parameters() if p.grad is None}
    if isinstance(unused, str):
        assert no_grad and all(n.startswith(unused) for n in no_grad)
    else:
        assert no_grad == unused
    assert ddp_find_unused_parameters(cfg) == bool(no_grad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.fsdp.param_dtype=float16"], "trainer.fsdp.param_dtype: .*gradient scaler"),
        (["trainer.fsdp.reduce_dtype=fp32"], "trainer.fsdp.reduce_dtype: must be float32 or bfloat16"),
        (["trainer.precision=bf16-mixed"], "trainer.precision: trainer=fsdp casts parameters itself"),
    ],
)
def test_fsdp_config_is_validated(overrides, message):
    cfg = compose_config([*TINY, "trainer=fsdp", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_rank_slices_rebuild_the_global_batch():
    cfg = compose_config(TINY)
    (batch,) = worker.make_global_batches(cfg, 1, 4, 2)
    parts = [worker.rank_slice(batch, r, 2) for r in range(2)]
    assert parts[0]["global_crops"].shape[0] == 4 and parts[0]["local_crops"].shape[0] == 4
    assert sum(int(p["n_masked_patches"]) for p in parts) == int(batch["n_masked_patches"])
    assert torch.equal(parts[0]["masks"], parts[1]["masks"])  # equal mask layouts (see make_global_batches)
    # view 1 of rank 1's first image is view 1 of global image 2
    torch.testing.assert_close(parts[1]["global_crops"][2], batch["global_crops"][4 + 2])


# ------------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, batches: Path, out: Path, scenarios: list[str], timeout: float = 240) -> float:
    """Run the worker under torchrun with ``nproc`` CPU processes; returns the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WANDB_MODE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "tests.lit.distributed_worker",
        str(batches),
        str(out),
        *scenarios,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        errors = [torch.load(f, weights_only=False).get("exception") for f in sorted(out.glob("*.rank*.pt"))]
        details = "\n".join(e for e in errors if e) or proc.stderr[-6000:]
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{details}")
    return elapsed


def load(out: Path, name: str, rank: int = 0) -> dict:
    result = torch.load(out / f"{name}.rank{rank}.pt", weights_only=False)
    assert "exception" not in result, result.get("exception")
    return result


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    if not torch.allclose(got, want, rtol=rtol, atol=atol):  # assert_close only for the message: it is slow
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_state(state: dict, reference: dict, what: str) -> None:
    """Equal within float tolerance. The attention *key* bias is the exception: softmax is invariant to it,
    so its gradient is analytically zero and only float noise, which AdamW's normalisation turns into
    lr-sized random steps; it is compared loosely (it still must not go anywhere else)."""
    assert state.keys() == reference.keys()
    for key, want in reference.items():
        got = state[key]
        if key.endswith("attn.qkv.bias"):
            dim = want.shape[0] // 3
            _close(got[dim : 2 * dim], want[dim : 2 * dim], 0.0, 1e-4, f"{what} {key} (key part)")
            got, want = torch.cat([got[:dim], got[2 * dim :]]), torch.cat([want[:dim], want[2 * dim :]])
        _close(got, want, RTOL, ATOL, f"{what} {key}")


def assert_same_run(dist_results: list[dict], reference: dict, what: str) -> None:
    losses = torch.tensor([r["losses"] for r in dist_results]).mean(0)  # the global loss: mean over ranks
    torch.testing.assert_close(losses, torch.tensor(reference["losses"]), rtol=RTOL, atol=ATOL, msg=what)
    for rank_result in dist_results:  # clip_grad_norm_'s norms are global on every rank
        for got, want in zip(rank_result["grad_norms"], reference["grad_norms"], strict=True):
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=RTOL, abs=ATOL), f"{what}: grad norm {key}"
    assert_same_state(dist_results[0]["state"], reference["state"], what)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-process launch for every scenario, one one-process launch, and the references."""
    with one_thread():
        return _runs(tmp_path_factory)


def _runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    base = compose_config(worker.scenario_overrides())
    batches = worker.make_global_batches(base, worker.STEPS, worker.PER_RANK * worker.WORLD, worker.WORLD)
    torch.save(batches, out / "batches.pt")
    shards_cfg = worker._pretrain_cfg(out / "unused", 1, 1)
    from vitreg.data.synthetic_shards import ensure_synthetic_shards

    syn = shards_cfg.data.synthetic  # made here once, not raced by two ranks
    ensure_synthetic_shards(
        shards_cfg.paths.cache_dir,
        num_images=syn.num_images,
        image_size=syn.image_size,
        num_classes=syn.num_classes,
        seed=shards_cfg.seed,
        class_appearance=syn.class_appearance,
    )
    timings = {}
    start = time.perf_counter()
    references = {}
    for centering in ("centering", "sinkhorn_knopp"):
        cfg = worker.config("auto", 1, worker.PER_RANK * worker.WORLD, centering=centering)
        _, module = worker.fit(cfg, batches)
        references[centering] = {"losses": module.losses, "grad_norms": module.grad_norms}
        references[centering]["state"] = worker.full_state(module)
    timings["reference (1 process, 2 runs)"] = time.perf_counter() - start
    two = [
        *EQUALITY,
        "ddp_koleo",
        "ddp_bf16_hook",
        "fsdp_bf16",
        "fsdp_resume",
        "ddp_to_fsdp",
        "pretrain_fsdp",
        "pretrain_ddp",
    ]
    timings["torchrun 2 processes"] = launch(2, out / "batches.pt", out, two)
    timings["torchrun 1 process"] = launch(1, out / "batches.pt", out, ["fsdp_resume_world1", "pretrain_fsdp_world1"])
    print("timings:", {k: f"{v:.1f}s" for k, v in timings.items()})
    return out, references


@pytest.mark.slow
@pytest.mark.parametrize("name", EQUALITY)
def test_two_processes_train_like_one_with_the_global_batch(runs, name):
    out, references = runs
    centering = worker.scenario_centering(name)
    results = [load(out, name, rank) for rank in range(worker.WORLD)]
    assert_same_run(results, references[centering], name)
    assert len(results[0]["losses"]) == worker.STEPS
    if name.startswith("fsdp"):
        sharding = results[0]["sharding"]
        # every parameter is a DTensor, and the teacher's shards line up with the student's (local EMA)
        assert sharding["dtensors"] == sharding["params"] > 0 and sharding["mismatched"] == 0


@pytest.mark.slow
def test_bf16_gradient_all_reduce_stays_close_to_fp32(runs):
    out, references = runs
    results = [load(out, "ddp_bf16_hook", rank) for rank in range(worker.WORLD)]
    losses = torch.tensor([r["losses"] for r in results]).mean(0)
    want = torch.tensor(references["centering"]["losses"])
    torch.testing.assert_close(losses[0], want[0], rtol=RTOL, atol=ATOL)  # step 0: before any reduced gradient
    torch.testing.assert_close(losses, want, rtol=2e-2, atol=2e-2)  # bf16-rounded gradients after that
    assert not torch.equal(losses, want)  # the hook really ran: not the fp32 run


@pytest.mark.slow
def test_koleo_runs_per_rank(runs):
    out, _ = runs
    for rank in range(worker.WORLD):
        result = load(out, "ddp_koleo", rank)
        assert len(result["losses"]) == worker.STEPS and all(torch.isfinite(torch.tensor(result["losses"])))


@pytest.mark.slow
def test_fsdp_bf16_compute_keeps_fp32_master_weights(runs):
    out, references = runs
    results = [load(out, "fsdp_bf16", rank) for rank in range(worker.WORLD)]
    assert results[0]["master_dtypes"] == ["torch.float32"]  # the sharded parameters the optimiser updates
    losses = torch.tensor([r["losses"] for r in results]).mean(0)
    assert torch.isfinite(losses).all()
    # step 0 (same weights, bf16 matmuls): close to the fp32 reference, not equal
    assert losses[0].item() == pytest.approx(references["centering"]["losses"][0], rel=2e-2)


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_exactly(runs):
    out, references = runs
    results = [load(out, "fsdp_resume", rank) for rank in range(worker.WORLD)]
    result = results[0]
    assert result["resumed_step"] == worker.STEPS and len(result["losses"]) == 1  # only step 2 ran after resume
    # a directory: torch.distributed.checkpoint's metadata, one shard file per rank, Lightning's meta.pt
    assert {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"} <= set(result["ckpt_files"])
    ref = references["centering"]
    loss = torch.tensor([r["losses"] for r in results]).mean(0)
    torch.testing.assert_close(loss, torch.tensor(ref["losses"][-1:]), rtol=RTOL, atol=ATOL)
    assert_same_state(result["state"], ref["state"], "resumed")


@pytest.mark.slow
def test_ddp_checkpoint_file_resumes_under_fsdp(runs):
    """A full checkpoint (trainer=ddp or one process) loads into the sharded module and optimiser; the
    AdamW states are matched by the parameter groups' names, not by position."""
    out, references = runs
    results = [load(out, "ddp_to_fsdp", rank) for rank in range(worker.WORLD)]
    assert results[0]["resumed_step"] == worker.STEPS and len(results[0]["losses"]) == 1
    ref = references["centering"]
    loss = torch.tensor([r["losses"] for r in results]).mean(0)
    torch.testing.assert_close(loss, torch.tensor(ref["losses"][-1:]), rtol=RTOL, atol=ATOL)
    assert_same_state(results[0]["state"], ref["state"], "ddp -> fsdp")


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_with_another_world_size(runs):
    """DCP reshards parameters and AdamW states: one process with the same global batch continues the
    two-process run exactly."""
    out, references = runs
    result = load(out, "fsdp_resume_world1")
    assert result["resumed_step"] == worker.STEPS and len(result["losses"]) == 1
    ref = references["centering"]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"][-1:]), rtol=RTOL, atol=ATOL)
    assert_same_state(result["state"], ref["state"], "resumed")


@pytest.mark.slow
def test_pretrain_with_fsdp_telemetry_and_knn(runs):
    """The production path on 2 processes, bf16 compute: the probes' forwards run on every rank in lock-step
    (the probe images are split across ranks, the features gathered), telemetry
    measures a gathered fp32 copy on rank 0 (no deadlock either way); last.ckpt is a sharded directory."""
    out, _ = runs
    result = load(out, "pretrain_fsdp")
    assert result["first"]["steps"] == 2
    assert result["first"]["knn"]["before"] and result["first"]["knn"]["after"]
    other = load(out, "pretrain_fsdp", rank=1)  # features gathered: both ranks computed the same numbers
    assert other["first"]["knn"] == result["first"]["knn"] and other["first"]["linear"] == result["first"]["linear"]
    assert {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"} <= set(result["last_files"])
    assert result["last_problem"] is None  # sharded_checkpoint_problem accepts it
    # telemetry at step 0 (before any training forward) and at the end of the first run (step 2)
    assert {0, 2} <= {r["step"] for r in result["telemetry_records"]}


@pytest.mark.slow
def test_pretrain_resumes_an_fsdp_sharded_checkpoint(runs):
    out, _ = runs
    result = load(out, "pretrain_fsdp")
    assert result["resume_error"] is None, result["resume_error"]
    assert result["second"]["steps"] == 3
    # probe state is in the sharded checkpoint's meta.pt (restored after on_fit_start under FSDP2)
    assert result["second"]["knn"]["before"] == result["first"]["knn"]["before"]
    assert result["second"]["linear"]["history"][0] == result["first"]["linear"]["history"][0]
    assert sorted({r["step"] for r in result["telemetry_records"]}) == [0, 2, 3]


@pytest.mark.slow
def test_pretrain_with_ddp(runs):
    out, _ = runs
    result = load(out, "pretrain_ddp")
    assert result["summary"]["steps"] == 2 and result["last_is_file"]
    knn, linear = result["summary"]["knn"], result["summary"]["linear"]
    assert [s for s, _ in knn["history"]] == [0, 2] and knn["before"] and knn["after"]
    assert [s for s, _ in linear["history"]] == [1, 2] and linear["after"] is not None
    other = load(out, "pretrain_ddp", rank=1)["summary"]  # both ranks computed the same numbers
    assert other["knn"] == knn and other["linear"] == linear
    assert sorted({r["step"] for r in result["telemetry_records"]}) == [0, 2]


@pytest.mark.slow
def test_pretrain_refuses_another_world_size_by_name(runs):
    """pretrain() resumes data streams exactly, which a different world size cannot do: it must say so,
    naming both sizes (data.exact_resume=false continues with fresh streams)."""
    out, _ = runs
    error = load(out, "pretrain_fsdp_world1")["error"]
    assert error is not None and "2 processes" in error and "has 1" in error, error


def test_ddp_refuses_sharded_checkpoints(tmp_path):
    strategy = VitregDDPStrategy()
    with pytest.raises(ValueError, match=r"sharded FSDP2 checkpoint.*trainer=fsdp"):
        strategy.load_checkpoint(tmp_path)


def test_sharded_checkpoint_problem(tmp_path):
    assert sharded_checkpoint_problem(tmp_path / "missing") == "not a directory"
    assert "no .metadata" in sharded_checkpoint_problem(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"")
    assert "meta.pt unreadable" in sharded_checkpoint_problem(tmp_path)
    torch.save({"global_step": 3, "vitreg_distributed": {"strategy": "fsdp", "world_size": 2}}, tmp_path / "meta.pt")
    (tmp_path / "__0_0.distcp").write_bytes(b"")
    assert sharded_checkpoint_problem(tmp_path) == "1 shard files for a checkpoint written by 2 processes"
    (tmp_path / "__1_0.distcp").write_bytes(b"")
    assert sharded_checkpoint_problem(tmp_path) is None


def test_skipping_steps_is_refused_when_distributed():
    cfg = compose_config([*TINY, "trainer=ddp", "ssl.on_nonfinite=skip"])
    with pytest.raises(ConfigError, match=r"ssl\.on_nonfinite: skip is not possible with trainer=ddp"):
        validate_config(cfg)


def test_config_rejects_bad_num_nodes():
    cfg = compose_config(TINY)
    with open_dict(cfg):
        cfg.trainer.num_nodes = 0
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes"):
        validate_config(cfg)


def test_block_prefetch_order():
    from vitreg.lit.strategies import set_block_prefetch

    class Block:
        def __init__(self, i):
            self.i, self.forward, self.backward = i, None, None

        def set_modules_to_forward_prefetch(self, modules):
            self.forward = [m.i for m in modules]

        def set_modules_to_backward_prefetch(self, modules):
            self.backward = [m.i for m in modules]

    blocks = [Block(i) for i in range(4)]
    set_block_prefetch(blocks, 2, backward=True)
    assert [b.forward for b in blocks] == [[1, 2], [2, 3], [3], None]
    assert [b.backward for b in blocks] == [None, [0], [1, 0], [2, 1]]
    teacher = [Block(i) for i in range(3)]
    set_block_prefetch(teacher, 1, backward=False)  # the teacher has no backward
    assert [b.backward for b in teacher] == [None, None, None] and teacher[0].forward == [1]
    untouched = [Block(i) for i in range(3)]
    set_block_prefetch(untouched, 0, backward=True)
    assert all(b.forward is None and b.backward is None for b in untouched)

"""FSDP2 sharded checkpoint directories read in one process: the shards written by two real processes are
consolidated into the full tensors, and ``.metadata`` is read without ever building anything but DCP's
metadata classes."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitreg.models import build_vit
from vitreg.utils.sharded import is_sharded_checkpoint, load_sharded_tensors, read_sharded_checkpoint

MODEL = {"arch": "vitt", "embed_dim": 64, "depth": 2, "num_heads": 2, "num_register_tokens": 4, "patch_size": 14}
STEP = 7


def backbone(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vit("vitt", **{k: v for k, v in MODEL.items() if k != "arch"}, img_size=56)


def _save_worker(rank: int, path: str, port: int) -> None:
    """One of two ranks writing a checkpoint the way Lightning's ModelParallelStrategy does: DTensor shards
    (Shard(0)) of ``state_dict.objective.{teacher,student}.backbone.*`` and an optimiser entry through
    torch.distributed.checkpoint, ``meta.pt`` from rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        state = {}
        for which, seed in (("teacher", 0), ("student", 1)):
            for key, value in backbone(seed).state_dict().items():
                state[f"objective.{which}.backbone.{key}"] = distribute_tensor(value, mesh, [Shard(0)])
        optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "names": ["a"], "params": ["a"]}]}
        dcp.save({"state_dict": state, "optimizer_0": optimizer}, checkpoint_id=path)
        if rank == 0:
            meta = {
                "global_step": STEP,
                "hyper_parameters": {"cfg": {"model": MODEL, "augment": {"global_crops_size": 56}}},
            }
            torch.save(meta, Path(path) / "meta.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fsdp") / "run" / "checkpoints" / "last.ckpt"  # as in a run directory
    mp.start_processes(_save_worker, args=(str(path), _free_port()), nprocs=2, start_method="fork")
    return path


def test_two_ranks_shards_consolidate_to_the_full_tensors(sharded):
    assert is_sharded_checkpoint(sharded) and sorted(p.name for p in sharded.glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    tensors = load_sharded_tensors(sharded, lambda key: key.startswith("state_dict.objective.teacher.backbone."))
    expected = backbone(0).state_dict()
    assert sorted(tensors) == sorted(f"state_dict.objective.teacher.backbone.{k}" for k in expected)
    for key, value in expected.items():
        assert torch.equal(tensors[f"state_dict.objective.teacher.backbone.{key}"], value), key


def test_the_checkpoint_reads_like_a_lightning_file(sharded):
    checkpoint = read_sharded_checkpoint(sharded, "state_dict.objective.student.backbone.")
    assert checkpoint["global_step"] == STEP and checkpoint["hyper_parameters"]["cfg"]["model"] == MODEL
    student = backbone(1).state_dict()
    assert set(checkpoint["state_dict"]) == {f"objective.student.backbone.{k}" for k in student}


def test_load_backbone_rebuilds_the_run_model_from_a_sharded_directory(sharded):
    from vitreg.models.load import load_backbone

    for which, seed in (("teacher", 0), ("student", 1)):
        loaded = load_backbone(sharded, which)
        assert (loaded.source, loaded.step, loaded.train_resolution) == ("vitreg", STEP, 56)
        for (key, a), b in zip(loaded.model.state_dict().items(), backbone(seed).state_dict().values(), strict=True):
            assert torch.equal(a, b), (which, key)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch should-never-exist",))


def test_metadata_that_would_run_code_is_refused_unexecuted(tmp_path):
    folder = tmp_path / "evil.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(pickle.UnpicklingError, match=r"not a torch\.distributed\.checkpoint metadata class"):
        load_sharded_tensors(folder, lambda key: True)
    assert not Path("should-never-exist").exists() and not (tmp_path / "should-never-exist").exists()


@pytest.mark.slow
def test_analyze_reports_on_a_sharded_directory(sharded):
    """Before: 'could not read ... as a weights-only checkpoint (IsADirectoryError ...)'."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(repo / "train" / "analyze.py"), f"checkpoint={sharded}", "num_images=4"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=sharded.parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((sharded.parents[1] / "analysis").rglob("report.json"))

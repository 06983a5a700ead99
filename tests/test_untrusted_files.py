"""No file given to vitreg can run code: a pickle that would execute something on load is planted at
every entry point that reads a checkpoint or weights file, on the command line and in the library.

Every test runs with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, which makes torch's *default* load unpickle
anything: only an explicit ``weights_only=True`` at each load keeps these files inert."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates the ``marker`` directory: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(path: Path, marker: Path, **extra) -> Path:
    """A file that looks like a Lightning checkpoint (or a backbone) and carries the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": {"objective.teacher.backbone.cls_token": torch.zeros(1, 1, 8)},
        "global_step": 7,
        "hyper_parameters": {"cfg": {"seed": 0}},
        "callbacks": {"ExactResume": {"wandb_id": "abc", "payload": Payload(marker)}},
        **extra,
    }
    torch.save(checkpoint, path)
    return path


def plant_sharded(folder: Path, marker: Path) -> Path:
    """An FSDP2 sharded checkpoint directory whose ``meta.pt`` carries the payload."""
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    (folder / "__0_0.distcp").write_bytes(b"")
    torch.save({"global_step": 9, "payload": Payload(marker)}, folder / "meta.pt")
    return folder


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return tmp_path / "code-ran"


def test_the_payload_does_run_when_unpickled(tmp_path, marker):
    """The guard of every test below: the planted file really executes code when loaded unsafely."""
    path = plant(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def attempt(fn, *args, **kwargs) -> None:
    """Call an entry point that must refuse the file (any exception) without running its payload."""
    with contextlib.suppress(Exception, SystemExit):
        fn(*args, **kwargs)


def test_library_entry_points_never_run_code(tmp_path, marker):
    from vitreg.lit.checkpointing import AtomicCheckpointIO, newest_good_checkpoint, readable
    from vitreg.lit.module import DINOv2Module
    from vitreg.lit.resume import restore_wandb_id
    from vitreg.lit.strategies import sharded_checkpoint_problem
    from vitreg.models import load_backbone_weights, load_dinov2_backbone
    from vitreg.models.load import load_backbone
    from vitreg.utils.io import checkpoint_metadata, checkpoint_step

    evil = plant(tmp_path / "evil.ckpt", marker)
    sharded = plant_sharded(tmp_path / "run" / "checkpoints" / "step0000009.ckpt", marker)
    plant(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    calls = [
        (checkpoint_metadata, evil),
        (checkpoint_step, evil),
        (readable, evil),
        (readable, sharded),
        (sharded_checkpoint_problem, sharded),
        (checkpoint_metadata, sharded),
        (newest_good_checkpoint, tmp_path / "run" / "checkpoints"),
        (restore_wandb_id, evil, tmp_path / "wandb-run"),
        (AtomicCheckpointIO().load_checkpoint, evil),
        (DINOv2Module.load_from_checkpoint, evil),
        (load_backbone, evil),
        (load_dinov2_backbone, evil),
        (load_backbone_weights, torch.nn.Linear(2, 2), evil),
    ]
    for fn, *args in calls:
        attempt(fn, *args)
        assert not marker.exists(), f"{fn.__qualname__} executed code from {args[0]}"


def test_pretrain_never_runs_code_from_a_planted_checkpoint(tmp_path, marker):
    from vitreg.lit.pretrain import pretrain

    run = tmp_path / "run"
    for name in ("last.ckpt", "step0000012.ckpt"):  # resume=auto finds them in the run directory
        plant(run / "checkpoints" / name, marker)
    attempt(pretrain, compose_config([*TINY, "trainer.max_steps=1"], run_dir=run))
    assert not marker.exists()
    evil = plant(tmp_path / "evil.ckpt", marker)
    for override in (f"ckpt_path={evil}", f"model.pretrained_weights={evil}", "logger=wandb"):
        other = tmp_path / f"other-{len(override)}"
        plant(other / "checkpoints" / "last.ckpt", marker)  # the W&B id restore reads the resumed file
        attempt(pretrain, compose_config([*TINY, "trainer.max_steps=1", override], run_dir=other))
        assert not marker.exists(), override
    plant_sharded(tmp_path / "sharded" / "checkpoints" / "step0000009.ckpt", marker)
    attempt(pretrain, compose_config([*TINY, "trainer.max_steps=1"], run_dir=tmp_path / "sharded"))
    assert not marker.exists()


@pytest.mark.slow
def test_command_line_entry_points_never_run_code(tmp_path, marker):
    run = tmp_path / "run"
    plant(run / "checkpoints" / "last.ckpt", marker)
    evil = plant(tmp_path / "evil.ckpt", marker)
    commands = [
        ["train/pretrain.py", *TINY, "trainer.max_steps=1", f"paths.output_root={tmp_path}", "run_name=run"],
        ["train/pretrain.py", *TINY, "trainer.max_steps=1", f"paths.output_root={tmp_path}", f"ckpt_path={evil}"],
        ["train/analyze.py", f"checkpoint={evil}", f"out={tmp_path / 'report'}"],
        ["scripts/export_backbone.py", str(run)],
        ["scripts/export_backbone.py", str(evil)],
        ["scripts/convert_dinov2_checkpoint.py", str(evil), str(tmp_path / "converted.pth")],
    ]
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    for command in commands:
        result = subprocess.run(
            [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode != 0, f"{command} accepted the file"
        assert not marker.exists(), f"{command} executed code from the file"


def test_resuming_a_sharded_directory_never_unpickles_code_from_its_metadata(tmp_path, marker):
    # DCP's own reader unpickles ``.metadata`` with plain pickle (it ran the payload before this check): the
    # strategy vets it with the restricted unpickler first, so a planted index is refused and runs nothing
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from vitreg.lit.strategies import FSDP2Strategy

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"global_step": 9}, folder / "meta.pt")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        strategy = FSDP2Strategy()
        strategy.model = torch.nn.Linear(2, 2)  # a sharded model to resume into, as fit sets it up
        fully_shard(strategy.model)
        strategy._lightning_module = types.SimpleNamespace(strict_loading=True)
        with pytest.raises(pickle.UnpicklingError, match=r"not a torch\.distributed\.checkpoint metadata class"):
            strategy.load_checkpoint(folder)
    finally:
        dist.destroy_process_group()
    assert not marker.exists()

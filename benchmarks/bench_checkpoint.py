"""Time to write and to load a full training checkpoint (student, teacher, heads, AdamW state), and its
size: what `--signal=USR1@<seconds>` must leave room for before a SLURM time limit.

Builds the real ``DINOv2Module`` of a config (default: DINOv2's ViT-L/14 reg4 recipe), gives every
parameter an AdamW state (one optimizer step on zero gradients), then writes the checkpoint
through ``AtomicCheckpointIO`` (checksum, temporary file, fsync, rename) and loads it back, in this
process. Also times the two costs of the payload checksum: computing it (part of every write) and
verifying it, as resume does (``newest_good_checkpoint``: step metadata, then every tensor read once).

    python benchmarks/bench_checkpoint.py                                   # experiment=dinov2_vitl14_reg4
    python benchmarks/bench_checkpoint.py --dir /scratch/$USER -- model=vitg registers=4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir

from vitreg.config import register_configs
from vitreg.lit.checkpointing import AtomicCheckpointIO, newest_good_checkpoint, payload_checksum
from vitreg.lit.module import DINOv2Module

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=dinov2_vitl14_reg4)")
    args = parser.parse_args()
    overrides = args.overrides or ["experiment=dinov2_vitl14_reg4"]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    module = DINOv2Module(cfg)
    optimizer = module.configure_optimizers()
    for p in module.student.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates exp_avg / exp_avg_sq for every parameter
    checkpoint = {
        "state_dict": module.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
        "global_step": 0,
        "hyper_parameters": dict(module.hparams),
    }
    n_params = sum(p.numel() for p in module.parameters())
    start = time.perf_counter()
    payload_checksum(checkpoint)
    checksum = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "last.ckpt"
        start = time.perf_counter()
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
        write = time.perf_counter() - start
        size = path.stat().st_size
        del checkpoint
        start = time.perf_counter()
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        load = time.perf_counter() - start
        assert loaded["global_step"] == 0
        del loaded
        start = time.perf_counter()
        assert newest_good_checkpoint(Path(tmp)) == path
        verify = time.perf_counter() - start
    print(f"config: {' '.join(overrides)}")
    print(f"parameters (student + teacher + heads): {n_params / 1e6:.1f}M; checkpoint {size / 2**30:.2f} GiB")
    print(f"write (checksum + temp file + fsync + rename): {write:.1f} s ({size / 2**20 / write:.0f} MiB/s)")
    print(f"  of which the payload checksum (crc32): {checksum:.1f} s ({checksum / write:.0%} of the write)")
    print(f"load: {load:.1f} s ({size / 2**20 / load:.0f} MiB/s)")
    print(f"resume's choice and checksum verification: {verify:.1f} s ({verify / load:.2f}x the load)")


if __name__ == "__main__":
    main()

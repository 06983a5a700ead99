"""Worker for tests/eval/test_linear.py: the linear probe in real processes (torchrun, gloo on CPU).

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.eval.linear_worker
<out_dir>`` from the repository root. Each rank writes ``<out_dir>/<scenario>.rank<r>.pt`` with the probe's
result and the grid's final weights:

- ``cached``: the planted-map features (every rank holds all of them, as ``extract_features`` returns them)
  with ``PER_RANK`` rows per rank and step; must equal one process with ``WORLD·PER_RANK`` rows.
- ``augmented``: a tiny ViT on synthetic images, each rank drawing its own share; the ranks must agree.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from vitreg.eval.features import Features
from vitreg.eval.linear import LinearSettings, probe_features, run_linear_probe
from vitreg.models.vision_transformer import build_vit

WORLD = 2
PER_RANK = 16
CLASSES = 4
SYNTHETIC = {"num_images": 24, "image_size": 32, "num_classes": 3}


def planted_features(n: int, dim: int, weight: torch.Tensor, generator: torch.Generator, n_blocks: int = 1):
    """x ~ N(0, I) as the last block's CLS, labels argmax(W x); earlier blocks and the patch mean are noise."""
    cls = torch.randn(n, n_blocks, dim, generator=generator)
    patch_mean = torch.randn(n, dim, generator=generator)
    return Features(cls=cls, patch_mean=patch_mean, labels=(cls[:, -1] @ weight.T).argmax(dim=1))


def planted_split(seed: int = 0) -> tuple[Features, Features]:
    """A small planted problem (train has a size no global batch divides, so batches cross passes)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(CLASSES, 8, generator=gen)
    return planted_features(100, 8, weight, gen, n_blocks=2), planted_features(50, 8, weight, gen, n_blocks=2)


def cached_settings(batch_size: int) -> LinearSettings:
    return LinearSettings(
        n_last_blocks=(1, 2), learning_rates=(0.01, 0.5), epochs=3, batch_size=batch_size, mode="cached"
    )


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vitt", num_register_tokens=4, img_size=28, patch_size=14, depth=2).eval()


def augmented_settings() -> LinearSettings:
    settings = LinearSettings(
        n_last_blocks=(1, 2), learning_rates=(1e-3, 0.1), epochs=1, iterations_per_epoch=3, batch_size=4, resolution=28
    )
    return settings


def run(name: str) -> dict:
    if name == "cached":
        train, val = planted_split()
        probe = probe_features(train, val, cached_settings(PER_RANK))
    elif name == "augmented":
        probe = run_linear_probe(tiny_vit(), "synthetic", "synthetic", augmented_settings(), synthetic=SYNTHETIC)
    else:
        raise ValueError(f"unknown scenario {name}")
    return {"result": probe.result, "state": {k: v.detach().clone() for k, v in probe.grid.state_dict().items()}}


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    failed = False
    try:
        for name in ("cached", "augmented"):
            try:
                record = run(name)
            except Exception:
                failed = True
                record = {"exception": traceback.format_exc()}
            torch.save(record, out / f"{name}.rank{rank}.pt")
            if failed:
                break
    finally:
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

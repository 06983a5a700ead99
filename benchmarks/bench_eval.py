"""Offline kNN and linear evaluation speed, against the bare backbone forward measured in the same run.

The baseline is the model alone: ``forward_features`` on random tensors already on the device, under the
same autocast. Then the real evaluations of ``vitreg.eval`` on ``--images`` generated labelled images per
split (synthetic shapes, decoded and transformed by the loader workers like real data):

- kNN: extract the bank and the queries, then DINOv2's kNN (k = 10, 20, 100, 200);
- linear, cached: extract the train and val features once, then train the 52-classifier grid;
- linear, augmented (DINOv2's protocol): ``--linear-iterations`` iterations of random-resized-crop
  batches through the backbone, then the val features.

Printed: wall time, images/s and the ratio of each pipeline's image rate to the bare forward (1.0 =
the evaluation costs no more than the model itself; lower = data loading, transforms, gathering or the
classifiers add that much).

    python benchmarks/bench_eval.py                                    # vitl, 10k images per split, GPU
    python benchmarks/bench_eval.py --model vitt --images 512 --resolution 112 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitreg.data.transforms import eval_transform
from vitreg.eval.data import eval_loader
from vitreg.eval.knn import evaluate_knn
from vitreg.eval.linear import LinearSettings, run_linear_probe
from vitreg.models.vision_transformer import build_vit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def bare_forward_rate(model, batch: int, resolution: int, batches: int, device, dtype) -> float:
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    with autocast(device, dtype):
        model.forward_features(x)  # warm-up (kernels, allocator)
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            model.forward_features(x)
        sync(device)
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vitl")
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--images", type=int, default=10_000, help="generated labelled images per split")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--linear-iterations", type=int, default=200, help="augmented-mode iterations")
    parser.add_argument("--linear-epochs", type=int, default=10, help="cached-mode passes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = {"float32": None, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else None
    )
    torch.manual_seed(0)
    model = build_vit(args.model, num_register_tokens=args.registers, patch_size=14, img_size=args.resolution)
    model.to(device).eval().requires_grad_(False)
    synthetic = {"num_images": args.images, "image_size": 96, "num_classes": 10}
    print(
        f"{args.model}/14 + {args.registers} registers at {args.resolution}px, {args.images} images per split, "
        f"batch {args.batch_size}, {args.workers} workers, {device} {dtype or 'float32'}"
    )
    bare = bare_forward_rate(model, args.batch_size, args.resolution, max(2, 2048 // args.batch_size), device, dtype)
    print(f"{'bare forward_features':32s} {bare:9.1f} img/s   ratio 1.00")

    def loader(split: str):
        return eval_loader(
            "synthetic",
            eval_transform(args.resolution),
            batch_size=args.batch_size,
            num_workers=args.workers,
            split=split,
            synthetic=synthetic,
        )

    def report(name: str, seconds: float, images: int) -> None:
        rate = images / seconds
        print(f"{name:32s} {rate:9.1f} img/s   ratio {rate / bare:4.2f}   ({seconds:.1f} s for {images} images)")

    start = time.perf_counter()
    knn = evaluate_knn(model, loader("train"), loader("val"), device=device, autocast_dtype=dtype)
    sync(device)
    report("kNN (extract + classify)", time.perf_counter() - start, 2 * args.images)
    print(f"{'':32s} best k={knn['best']['k']} top-1 {knn['best']['top1']:.1f}% (random weights: chance level)")

    for mode, epochs, iters in (("cached", args.linear_epochs, 1), ("augmented", 1, args.linear_iterations)):
        settings = LinearSettings(
            epochs=epochs, iterations_per_epoch=iters, batch_size=args.batch_size, mode=mode, resolution=args.resolution
        )
        common = {"synthetic": synthetic, "num_workers": args.workers, "device": device, "autocast_dtype": dtype}
        start = time.perf_counter()
        probe = run_linear_probe(model, "synthetic", "synthetic", settings, **common)
        sync(device)
        seconds = time.perf_counter() - start
        seen = args.images * 2 if mode == "cached" else args.linear_iterations * args.batch_size + args.images
        report(f"linear {mode} (52 classifiers)", seconds, seen)
        print(f"{'':32s} {probe.result['iterations']} iterations, best top-1 {probe.result['best']['top1']:.1f}%")


if __name__ == "__main__":
    main()

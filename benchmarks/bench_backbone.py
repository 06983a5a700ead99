"""Backbone speed and memory: attention backends, and the packed multi-crop forward.

Prints forward+backward throughput (img/s) and peak memory per attention backend, as ratios to
SDPA measured in the same run; then the packed list forward of [global, local] crops against
separate forwards (time ratio, and the max output difference). Also checks that every backend
agrees with the math path in the chosen dtype.

    # the H200 check of the foundation issue
    python benchmarks/bench_backbone.py --model vitl --registers 4 --batch 64 --dtype bf16
    # a quick CPU run
    python benchmarks/bench_backbone.py --model vitt --batch 8 --steps 3 --local-batch 16
"""

from __future__ import annotations

import argparse
import time

import torch

from vitreg.models import build_vit, xformers_available

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Mean seconds per call and peak memory in GiB (CUDA only; NaN on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vitl")
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--ffn", default=None, help="mlp or swiglu (default: the size's own)")
    parser.add_argument("--batch", type=int, default=64, help="global-crop batch")
    parser.add_argument("--local-batch", type=int, default=None, help="local-crop batch (default 4x batch)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    extra = {"ffn_layer": args.ffn} if args.ffn else {}
    cfg = {"num_register_tokens": args.registers, "patch_size": args.patch, "img_size": args.size, **extra}
    backends = ["sdpa", "math"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])
    reference = build_vit(args.model, attn_backend="math", **cfg).to(device)
    state = reference.state_dict()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    print(
        f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
        f"torch={torch.__version__} model={args.model}/{args.patch} reg={args.registers} "
        f"batch={args.batch} {args.size}px dtype={args.dtype}"
    )

    with torch.no_grad(), autocast:
        expected = reference.forward_features(images[:8])["x_prenorm"].float()
    del reference

    results = {}
    for backend in backends:
        model = build_vit(args.model, attn_backend=backend, **cfg).to(device)
        model.load_state_dict(state)
        model.train()
        with torch.no_grad(), autocast:
            diff = (model.forward_features(images[:8])["x_prenorm"].float() - expected).abs().max().item()

        def step(model=model):
            with autocast:
                out = model.forward_features(images)
                loss = out["x_norm_clstoken"].float().square().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        seconds, peak = timed_steps(step, args.steps, args.warmup, device)
        results[backend] = (args.batch / seconds, peak, diff)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base_speed, base_mem, _ = results["sdpa"]
    print(f"\n{'backend':10s} {'img/s':>9s} {'x sdpa':>7s} {'peak GiB':>9s} {'x sdpa':>7s} {'max|d| vs math':>15s}")
    for backend, (speed, peak, diff) in results.items():
        print(f"{backend:10s} {speed:9.1f} {speed / base_speed:7.2f} {peak:9.2f} {peak / base_mem:7.2f} {diff:15.2e}")

    # packed multi-crop forward vs separate forwards (inference, default backend)
    local_batch = args.local_batch or 4 * args.batch
    model = build_vit(args.model, **cfg).to(device).eval()
    model.load_state_dict(state)
    crops = [images, torch.randn(local_batch, 3, args.local_size, args.local_size, device=device)]
    with torch.no_grad(), autocast:
        packed_out = model.forward_features(crops)
        separate_out = [model.forward_features(c) for c in crops]
        diff = max(
            (p["x_prenorm"].float() - s["x_prenorm"].float()).abs().max().item()
            for p, s in zip(packed_out, separate_out, strict=True)
        )

        def packed():
            model.forward_features(crops)

        def separate():
            for c in crops:
                model.forward_features(c)

        t_sep, _ = timed_steps(separate, args.steps, args.warmup, device)
        t_packed, _ = timed_steps(packed, args.steps, args.warmup, device)
    print(
        f"\nmulti-crop [{args.batch}x{args.size}px, {local_batch}x{args.local_size}px] forward: "
        f"separate {t_sep * 1e3:.1f} ms, packed {t_packed * 1e3:.1f} ms, "
        f"packed/separate time {t_packed / t_sep:.2f}, max|diff| {diff:.2e}"
    )


if __name__ == "__main__":
    main()

"""Numerical parity of vitreg's backbone with the official DINOv2 implementation.

Needs a checkout of facebookresearch/dinov2 (not a dependency of vitreg; nothing of it is copied):

    python scripts/check_dinov2_parity.py --dinov2-repo /path/to/dinov2 [--arch vit_small]
    python scripts/check_dinov2_parity.py --dinov2-repo /path/to/dinov2 --arch vit_large --registers 4 --ffn mlp

For each configuration it builds the official ``DinoVisionTransformer`` (its own random init),
converts its state dict with vitreg's loader (hub and chunked layouts), and compares
``forward_features`` at 224x224, 518x518 and a non-square size, with and without masks, plus
``get_intermediate_layers``. Exits non-zero when any difference exceeds ``--atol``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from vitreg.models import export_dinov2_state_dict, load_dinov2_backbone

SIZES = [(224, 224), (518, 518), (266, 378)]


def official_model(vits, arch: str, registers: int, ffn: str, block_chunks: int):
    kwargs = {
        "img_size": 518,
        "patch_size": 14,
        "init_values": 1.0,
        "block_chunks": block_chunks,
        "num_register_tokens": registers,
        "interpolate_antialias": registers > 0,
        "interpolate_offset": 0.0 if registers > 0 else 0.1,
        "ffn_layer": ffn,
    }
    model = getattr(vits, arch)(**kwargs)
    # LayerScale 1.0 everywhere would hide ls bugs: give every gamma distinct values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or "register_tokens" in name or "cls_token" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def max_diff(a: dict, b: dict) -> float:
    keys = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
    return max((a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0 for k in keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dinov2-repo", required=True, help="path to a facebookresearch/dinov2 checkout")
    parser.add_argument("--arch", default="vit_small", help="official arch function (vit_small, vit_base, …)")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--registers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--ffn", nargs="+", default=["mlp", "swiglufused"], help="official ffn_layer values")
    parser.add_argument("--block-chunks", type=int, nargs="+", default=[0, 4])
    args = parser.parse_args()

    sys.path.insert(0, args.dinov2_repo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dinov2.models import vision_transformer as vits

    torch.manual_seed(0)
    worst, failures = 0.0, 0
    print(f"{'config':44s} {'size':>9s} {'masks':>5s}  max|diff|")
    for registers in args.registers:
        for ffn in args.ffn:
            for block_chunks in args.block_chunks:
                ref = official_model(vits, args.arch, registers, ffn, block_chunks)
                ours = load_dinov2_backbone(ref.state_dict()).eval()
                if block_chunks == 0:  # export must give back the official file exactly
                    exported = export_dinov2_state_dict(ours, "hub")
                    same = list(exported) == list(ref.state_dict()) and all(
                        torch.equal(exported[k], v) for k, v in ref.state_dict().items()
                    )
                    failures += not same
                    print(f"  export round trip ({args.arch}, reg={registers}, {ffn}): {'ok' if same else 'FAIL'}")
                label = f"{args.arch} reg={registers} {ffn} chunks={block_chunks}"
                for h, w in SIZES:
                    x = torch.randn(args.batch, 3, h, w)
                    n = (h // 14) * (w // 14)
                    for use_masks in (False, True):
                        masks = torch.rand(args.batch, n) < 0.4 if use_masks else None
                        with torch.no_grad():
                            a = ref.forward_features(x, masks=masks)
                            b = ours.forward_features(x, masks=masks)
                        d = max_diff(a, b)
                        worst = max(worst, d)
                        failures += d > args.atol
                        print(f"{label:44s} {h:4d}x{w:<4d} {use_masks!s:>5s}  {d:.2e}")
                    with torch.no_grad():
                        la = ref.get_intermediate_layers(x, n=[0, 5, 11], return_class_token=True, reshape=True)
                        lb = ours.get_intermediate_layers(x, n=[0, 5, 11], return_class_token=True, reshape=True)
                    d = max(
                        (p - q).abs().max().item()
                        for ta, tb in zip(la, lb, strict=True)
                        for p, q in zip(ta, tb, strict=True)
                    )
                    worst = max(worst, d)
                    failures += d > args.atol
    print(f"worst max|diff| = {worst:.2e} (atol {args.atol}); {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Convert a DINOv2 backbone checkpoint between official layouts (and check it loads strictly).

    # a training-time teacher dump -> a hub-style backbone file
    python scripts/convert_dinov2_checkpoint.py eval/training_12499/teacher_checkpoint.pth vitl14_reg4.pth
    # the student of a trainer checkpoint, chunked like DINOv2's training (block_chunks=4)
    python scripts/convert_dinov2_checkpoint.py model_0012499.rank_0.pth out.pth --which student --layout chunked

Reads with ``weights_only=True``; writes atomically. The architecture is inferred from the tensors.
"""

from __future__ import annotations

import argparse

from vitreg.models import load_dinov2_backbone, save_dinov2_checkpoint
from vitreg.models.checkpoint import LAYOUTS, describe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint file in any official layout (hub, chunked, teacher, trainer)")
    parser.add_argument("output", help="where to write the converted backbone")
    parser.add_argument("--layout", choices=LAYOUTS, default="hub")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--block-chunks", type=int, default=4, help="chunks for --layout chunked")
    parser.add_argument("--num-heads", type=int, default=None, help="only for heads that are not 64-dim")
    args = parser.parse_args(argv)

    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    model = load_dinov2_backbone(args.source, which=args.which, **overrides)
    save_dinov2_checkpoint(model, args.output, layout=args.layout, block_chunks=args.block_chunks)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{describe(model.cfg)}, {n_params / 1e6:.2f}M parameters -> {args.output} ({args.layout} layout)")


if __name__ == "__main__":
    main()

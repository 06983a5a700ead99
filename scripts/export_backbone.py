"""Export the teacher backbone of a vitreg run in the official DINOv2 layout, for downstream use.

    python scripts/export_backbone.py outputs/demo                       # the run's newest good checkpoint
    python scripts/export_backbone.py outputs/demo/checkpoints/step0001250.ckpt vitt14_reg4.pth
    python scripts/export_backbone.py outputs/demo --which student --layout chunked

The output (default ``<run_dir>/export/<checkpoint stem>_<which>_<layout>.pth``) loads with
``vitreg.models.load_dinov2_backbone`` and with DINOv2's own ``load_state_dict`` (hub layout). Only the
backbone is written (no heads, no optimizer), atomically. DINOv2 files do not record the positional
interpolation settings; the script prints the ones this model was trained with, so a loader can set
them (``interpolate_antialias``, ``interpolate_offset``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitreg.lit.checkpointing import newest_good_checkpoint
from vitreg.models import load_dinov2_backbone, save_dinov2_checkpoint
from vitreg.models.checkpoint import LAYOUTS, describe
from vitreg.telemetry.analyze import load_backbone


def resolve_checkpoint(source: Path) -> Path:
    if source.is_dir():
        folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        found = newest_good_checkpoint(folder)
        if found is None:
            raise SystemExit(f"error: no checkpoint in {folder}")
        return found
    if not source.exists():
        raise SystemExit(f"error: no checkpoint at {source}")
    return source


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory or a vitreg .ckpt")
    parser.add_argument("output", type=Path, nargs="?", help="the .pth to write")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--layout", choices=LAYOUTS, default="hub")
    parser.add_argument("--block-chunks", type=int, default=4, help="chunks for --layout chunked")
    args = parser.parse_args(argv)

    checkpoint = resolve_checkpoint(args.source)
    loaded = load_backbone(checkpoint, which=args.which)
    model = loaded.model
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    output = args.output or run_dir / "export" / f"{checkpoint.stem}_{args.which}_{args.layout}.pth"
    save_dinov2_checkpoint(model, output, layout=args.layout, block_chunks=args.block_chunks)
    # the file must load back through the official-layout reader to the same weights
    again = load_dinov2_backbone(
        output,
        interpolate_antialias=model.cfg.antialias,
        interpolate_offset=model.cfg.offset,
        num_heads=model.cfg.num_heads,
    )
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        if not a.equal(b):
            raise SystemExit(f"error: {name} differs after the round trip through {output}")
    cfg = model.cfg
    print(f"{describe(cfg)} from {checkpoint} (step {loaded.step}) -> {output} ({args.layout} layout, {args.which})")
    print(
        f"positional interpolation it was trained with: interpolate_antialias={cfg.antialias}, "
        f"interpolate_offset={cfg.offset}, num_heads={cfg.num_heads}"
    )
    return output


if __name__ == "__main__":
    main()

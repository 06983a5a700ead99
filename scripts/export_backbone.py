"""Export the teacher (or student) backbone of a vitreg run for DINOv2, Hugging Face transformers or timm.

    python scripts/export_backbone.py outputs/demo                                   # DINOv2 hub .pth (default)
    python scripts/export_backbone.py outputs/demo --format hf --out outputs/demo/export/hf
    python scripts/export_backbone.py outputs/demo --format timm --out outputs/demo/export/vitt14_reg4.safetensors
    python scripts/export_backbone.py outputs/demo/checkpoints/step0000250.ckpt vitt14_reg4.pth
    python scripts/export_backbone.py outputs/demo --which student --layout chunked
    python scripts/export_backbone.py outputs/demo --test-time-registers outputs/demo/analysis/last/ttr.json

The source is a run directory (its newest intact checkpoint), a vitreg ``.ckpt``, an FSDP2 sharded
checkpoint directory, or any file ``vitreg.models.load_dinov2_backbone`` reads. Formats:
- ``dinov2``: a ``.pth`` in DINOv2's layout (``--layout hub|chunked|teacher``), for DINOv2's own
  ``load_state_dict`` and ``load_dinov2_backbone``. Default output
  ``<run_dir>/export/<checkpoint stem>_<which>_<layout>.pth``.
- ``hf``: a folder with ``config.json`` + ``model.safetensors`` for ``transformers.AutoModel.from_pretrained``
  (``Dinov2WithRegistersModel``, or ``Dinov2Model``). Default ``<run_dir>/export/<stem>_<which>_hf``.
- ``timm``: a ``.safetensors`` file for ``timm.create_model``; the exact call is printed. Default
  ``<run_dir>/export/<stem>_<which>_timm.safetensors``.
Every export also records the model (architecture, FFN, LayerScale, interpolation, image size, source
run, step, vitreg commit) in ``vitreg_export.json`` beside the file (inside the HF folder).
``--test-time-registers`` exports the model with test-time registers (docs/mitigation.md): the neurons of a
``register_neurons.json`` or ``ttr.json`` (with that run's ``ttr`` settings, unless ``--ttr-*`` options say
otherwise) are recorded, and vitreg's loaders give the model back with them. Only the
backbone is written (no heads, no optimizer), atomically, and the files are read back and compared with
the model's weights before the script reports success.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitreg.eval.ttr import read_neurons
from vitreg.lit.checkpointing import newest_good_checkpoint
from vitreg.models import TestTimeRegisters, TestTimeRegisterSettings, load_dinov2_backbone
from vitreg.models.checkpoint import LAYOUTS, describe
from vitreg.models.export import FORMATS, export_backbone
from vitreg.models.load import load_backbone
from vitreg.utils.sharded import is_sharded_checkpoint


def resolve_checkpoint(source: Path) -> Path:
    if is_sharded_checkpoint(source):  # an FSDP2 checkpoint is a directory itself
        return source
    if source.is_dir():
        folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        found = newest_good_checkpoint(folder)
        if found is None:
            raise SystemExit(f"error: no checkpoint in {folder}")
        return found
    if not source.exists():
        raise SystemExit(f"error: no checkpoint at {source}")
    return source


def default_output(checkpoint: Path, which: str, fmt: str, layout: str) -> Path:
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    stem = f"{checkpoint.stem}_{which}"
    name = {"dinov2": f"{stem}_{layout}.pth", "hf": f"{stem}_hf", "timm": f"{stem}_timm.safetensors"}[fmt]
    return run_dir / "export" / name


@torch.no_grad()
def check_round_trip(model: torch.nn.Module, output: Path, exact_weights: bool) -> str | None:
    """What differs when the written files are read back by vitreg's own readers (None: nothing).

    Weights must be equal, except for timm, whose CLS token carries its position folded in; tokens must
    be bitwise equal on a small non-square input (cheap even for a ViT-g; it runs the interpolation)."""
    again = load_dinov2_backbone(output)  # heads and interpolation come back from vitreg_export.json
    if exact_weights:
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
            if not a.equal(b):
                return f"{name} differs"
    cfg = model.cfg
    side = max(1, cfg.grid_size // 2)
    h, w = side * cfg.patch_size, (side + 1) * cfg.patch_size
    x = torch.randn(1, cfg.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    if not torch.equal(model.eval().forward_features(x)["x_prenorm"], again.eval().forward_features(x)["x_prenorm"]):
        return f"the tokens at {h}x{w} px differ"
    return None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory, a vitreg .ckpt or a sharded checkpoint directory")
    parser.add_argument("output", type=Path, nargs="?", help="where to write (same as --out)")
    parser.add_argument("--out", type=Path, help="the .pth (dinov2), folder (hf) or .safetensors (timm) to write")
    parser.add_argument("--format", choices=FORMATS, default="dinov2")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--layout", choices=LAYOUTS, default="hub", help="DINOv2 layout (--format dinov2)")
    parser.add_argument("--block-chunks", type=int, default=4, help="chunks for --layout chunked")
    parser.add_argument(
        "--test-time-registers", type=Path, metavar="JSON", help="a register_neurons.json or ttr.json: export with TTR"
    )
    parser.add_argument("--ttr-tokens", type=int, help="test-time registers added (default: the ttr.json's, or 1)")
    parser.add_argument("--ttr-scale", type=float, help="their activation scale (default: the ttr.json's, or 1.0)")
    parser.add_argument(
        "--ttr-patch-values", help="zero | mean | only_outliers | same (default: the ttr.json's, or zero)"
    )
    args = parser.parse_intermixed_args(argv)  # the output may follow the options
    if args.output and args.out and args.output != args.out:
        parser.error(f"two outputs given: {args.output} and --out {args.out}")
    if args.format != "dinov2" and args.layout != "hub":
        parser.error("--layout applies to --format dinov2 only")

    checkpoint = resolve_checkpoint(args.source)
    loaded = load_backbone(checkpoint, which=args.which)
    model = loaded.model
    if args.test_time_registers is not None:
        try:
            model = TestTimeRegisters.from_backbone(model, *ttr_from(args))
        except ValueError as err:
            raise SystemExit(f"error: --test-time-registers: {err}") from None
    output = args.out or args.output or default_output(checkpoint, args.which, args.format, args.layout)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    source = {"checkpoint": str(checkpoint.resolve()), "run_dir": run_dir and str(run_dir.resolve())}
    source.update(which=args.which, step=loaded.step, kind=loaded.source)
    try:
        result = export_backbone(model, args.format, output, source, args.layout, args.block_chunks)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    # what was written must read back (through vitreg's own readers) to the very same weights
    problem = check_round_trip(model, output, exact_weights=args.format != "timm")
    if problem:
        raise SystemExit(f"error: {problem} after the round trip through {output}")
    cfg = model.cfg
    print(f"{describe(cfg)} from {checkpoint} (step {loaded.step}) -> {output} ({_what(args)}, {args.which})")
    print(
        f"positional interpolation it was trained with: interpolate_antialias={cfg.antialias}, "
        f"interpolate_offset={cfg.offset}, num_heads={cfg.num_heads}"
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    prelude = {"hf": "import transformers", "timm": "import timm, torch"}.get(
        args.format, "from vitreg.models import load_dinov2_backbone"
    )
    print(f"load it with:\n  {prelude}\n  {result.usage}")
    return output


def ttr_from(args: argparse.Namespace) -> tuple[list[dict], TestTimeRegisterSettings]:
    """The neurons of ``--test-time-registers`` and the settings: the ``--ttr-*`` options, else the ttr.json's."""
    neurons = read_neurons(args.test_time_registers)
    recorded = json.loads(args.test_time_registers.read_text()).get("settings", {}).get("ttr", {})
    chosen = {
        "num_tokens": args.ttr_tokens if args.ttr_tokens is not None else recorded.get("num_tokens", 1),
        "scale": args.ttr_scale if args.ttr_scale is not None else recorded.get("scale", 1.0),
        "patch_values": args.ttr_patch_values or recorded.get("patch_values", "zero"),
    }
    return neurons, TestTimeRegisterSettings(**chosen)


def _what(args: argparse.Namespace) -> str:
    return f"{args.layout} layout" if args.format == "dinov2" else f"{args.format} format"


if __name__ == "__main__":
    main()

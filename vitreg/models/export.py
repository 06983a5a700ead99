"""Export a backbone to DINOv2's layout, a Hugging Face folder or a timm file, with a ``vitreg_export.json``
record beside it, and check that the written files read back to the same weights.

``vitreg_export.json`` maps the exported file's name (``model.safetensors`` inside an HF folder) to what
the files cannot say: architecture, FFN, LayerScale, positional interpolation, image size, source run,
step and the vitreg commit. Several exports may share a folder; each keeps its own entry.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from vitreg.models.checkpoint import save_dinov2_checkpoint
from vitreg.models.config import size_name
from vitreg.models.export_hf import (
    HF_INTERPOLATION,
    WEIGHTS_NAME,
    interpolation_mismatch,
    save_hf_folder,
    save_safetensors,
)
from vitreg.models.export_timm import TIMM_INTERPOLATION, timm_create_line, timm_kwargs, timm_state_dict
from vitreg.models.formats import RECORD_NAME
from vitreg.models.test_time_registers import TestTimeRegisters
from vitreg.models.vision_transformer import VisionTransformer
from vitreg.utils.io import atomic_write_bytes

FORMATS: tuple[str, ...] = ("dinov2", "hf", "timm")
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ExportResult:
    path: Path  # the file (dinov2, timm) or folder (hf) written
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    usage: str = ""  # the Python that loads it


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def vitreg_commit() -> dict[str, Any]:
    """The git commit of the vitreg code that runs, and whether its ``vitreg/`` files differ from it
    (both None outside a checkout of vitreg itself, e.g. an installed wheel inside another repository)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _PACKAGE_ROOT:
        return {"commit": None, "modified": None}
    status = _git("status", "--porcelain", "--", "vitreg")
    return {"commit": _git("rev-parse", "HEAD"), "modified": None if status is None else bool(status)}


def describe_model(model: VisionTransformer) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "arch": size_name(cfg),
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "num_register_tokens": cfg.num_register_tokens,
        "ffn_layer": cfg.ffn_layer,
        "ffn_hidden_dim": cfg.hidden_dim,
        "layerscale": cfg.layerscale_init is not None,
        "interpolation": {"antialias": cfg.antialias, "offset": cfg.offset, "mode": "bicubic"},
        "img_size": cfg.img_size,
        "in_chans": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "proj_bias": cfg.proj_bias,
        "ffn_bias": cfg.ffn_bias,
        "dtype": str(next(iter(model.state_dict().values())).dtype).removeprefix("torch."),
    }


def write_record(path: Path, entry: dict[str, Any]) -> Path:
    """Add ``entry`` for ``path`` (a file, or an HF folder) to its ``vitreg_export.json``, atomically."""
    record_file, name = (path / RECORD_NAME, WEIGHTS_NAME) if path.is_dir() else (path.parent / RECORD_NAME, path.name)
    records: dict[str, Any] = {}
    if record_file.is_file():
        try:
            records = json.loads(record_file.read_text())
        except ValueError:
            records = {}
    records[name] = entry
    return atomic_write_bytes(record_file, (json.dumps(records, indent=2, sort_keys=True) + "\n").encode())


def export_backbone(
    model: VisionTransformer,
    fmt: str,
    out: str | PathLike,
    source: dict[str, Any] | None = None,
    layout: str = "hub",
    block_chunks: int = 4,
) -> ExportResult:
    """Write ``model`` in ``fmt`` at ``out`` plus its ``vitreg_export.json`` entry.

    ``source`` describes where the weights came from (``checkpoint``, ``run_dir``, ``which``, ``step``).
    ``dinov2`` writes a ``.pth`` (``layout``: hub, chunked, teacher), ``hf`` a folder, ``timm`` a
    ``.safetensors`` file (the suffix is what timm's loader keys on)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out)
    cfg = model.cfg
    mismatch: str | None = None
    target: dict[str, Any] = {"format": fmt}
    if fmt == "dinov2":
        save_dinov2_checkpoint(model, out, layout=layout, block_chunks=block_chunks)
        target["layout"] = layout
        usage = (
            f"model = load_dinov2_backbone({str(out)!r}, num_heads={cfg.num_heads}, "
            f"interpolate_antialias={cfg.antialias}, interpolate_offset={cfg.offset})"
        )
    elif fmt == "hf":
        if out.exists() and not out.is_dir():
            raise ValueError(f"--format hf writes a folder, and {out} is a file")
        config = save_hf_folder(model, out)
        cls = config["architectures"][0]
        target.update(
            hf_class=cls, hf_interpolation=dict(zip(("antialias", "offset"), HF_INTERPOLATION[cls], strict=True))
        )
        mismatch = interpolation_mismatch(cfg, cls, HF_INTERPOLATION[cls])
        usage = f"model = transformers.{cls}.from_pretrained({str(out)!r})"
    else:
        if out.suffix != ".safetensors":
            raise ValueError(f"--format timm writes a .safetensors file (timm picks its reader by the suffix): {out}")
        kwargs = timm_kwargs(cfg)
        save_safetensors(timm_state_dict(model), out)
        usage = timm_create_line(cfg, out.resolve())
        target.update(timm_kwargs={k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in kwargs.items()})
        mismatch = interpolation_mismatch(cfg, "timm", TIMM_INTERPOLATION)
    warnings = [mismatch] if mismatch else []
    if fmt in ("hf", "timm") and not (cfg.proj_bias and cfg.ffn_bias):
        warnings.append("biases this model does not have were written as zeros (the target always has them)")
    ttr: dict[str, Any] = {}
    if isinstance(model, TestTimeRegisters):  # the files hold the backbone; the record says how to wrap it
        ttr = {"test_time_registers": model.describe()}
        usage += "  # with its test-time registers (vitreg_export.json)"
        if fmt != "dinov2":
            warnings.append(
                f"{fmt} loads the plain backbone: the test-time registers are applied by vitreg's loaders "
                "(load_dinov2_backbone reads them from vitreg_export.json)"
            )
    record = {
        **describe_model(model),
        **target,
        **ttr,
        "usage": usage,
        "exact_at": "the native image size only" if mismatch else "every image size",
        "source": {k: (str(v) if isinstance(v, Path) else v) for k, v in (source or {}).items()},
        "vitreg_code": vitreg_commit(),
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_record(out, record)
    return ExportResult(out, record, warnings, usage)

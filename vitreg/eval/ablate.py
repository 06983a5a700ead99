"""Replacement-controlled ablations (``task=ablate``): what registers, CLS or outlier tokens contribute,
measured without the overstatement of zeroing them.

Zeroing a token kind puts the network off its input distribution: on DINOv2-reg, zeroed registers cost up
to 36.6 points while replacing them by their mean, by matched noise or by another image's registers stays
within about a point (arXiv 2604.14433; Sun et al.'s "Fix-Reg-Mean", COLM 2024, replaces registers at every
layer by their mean and DINOv2-reg's ImageNet top-1 barely moves). So each target is replaced four ways
and the headline numbers (``vitreg.eval.compare``) are measured under each, beside the unedited baseline:

- ``zero``: the tokens become 0;
- ``mean``: their mean at that block over the reference set (per register index for registers);
- ``noise``: Gaussian, per channel (and register index) matched in mean and std to the same population;
- ``shuffle``: the tokens of a reference image drawn at random (seeded), so batch size 1 works. Registers and
  CLS take all their tokens from one drawn image, the same image at every edited block of a forward;
  outliers take each token from the reference set's outlier tokens at that block.

Targets: ``registers``, ``cls``, and ``outliers``: the patch tokens whose norm at a block's output exceeds
the threshold the detector fitted on the reference set's patch norms at that block; the mask is taken on
the tokens as the edited forward computes them. The statistics come from the unedited model, once, on the
reference set (the first ``reference_images`` of ``data.train``). The model is changed only through
``model.edit(outputs=...)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vitreg.data.transforms import eval_transform
from vitreg.eval.compare import MetricInputs, check_metrics, headline_numbers
from vitreg.eval.data import LabelledImages, collate_labelled
from vitreg.eval.runners import eval_resolution, synthetic_options
from vitreg.eval.token_probes import outlier_threshold
from vitreg.models.layout import TokenLayout
from vitreg.models.load import LoadedBackbone
from vitreg.telemetry.detectors import DETECTORS
from vitreg.utils.distributed import rank_and_world

log = logging.getLogger(__name__)

TARGETS: tuple[str, ...] = ("registers", "cls", "outliers")
REPLACEMENTS: tuple[str, ...] = ("zero", "mean", "noise", "shuffle")


@dataclass
class AblateSettings:
    """The ``ablate`` section of conf/analyze.yaml."""

    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    replacements: list[str] = field(default_factory=lambda: list(REPLACEMENTS))
    layers: list[int] | None = None  # blocks whose outputs are replaced; null: every block (Fix-Reg-Mean)
    reference_images: int = 64  # the first N images of data.train: the statistics' population
    metrics: list[str] = field(default_factory=lambda: ["telemetry", "knn", "lost"])
    detector: str = "valley"  # outliers: one of DETECTORS, fitted per block on the reference patch norms
    fixed_cutoff: float = 150.0
    seed: int = 0  # the noise and shuffle draws
    batch_size: int = 32  # reference-set forward passes

    def __post_init__(self) -> None:
        for key, allowed in (("targets", TARGETS), ("replacements", REPLACEMENTS)):
            chosen = list(getattr(self, key))
            if not chosen or any(c not in allowed for c in chosen):
                raise ValueError(f"ablate.{key} must list some of {list(allowed)}, got {chosen}")
        check_metrics(self.metrics, "ablate.metrics")
        if self.detector not in DETECTORS:
            raise ValueError(f"ablate.detector must be one of {DETECTORS}, got {self.detector!r}")
        if self.reference_images < 1 or self.batch_size < 1:
            raise ValueError("ablate.reference_images and ablate.batch_size must be >= 1")
        if self.layers is not None and not list(self.layers):
            raise ValueError("ablate.layers must be null (every block) or a non-empty list of block indices")


# ---------------------------------------------------------------- the reference statistics
@dataclass
class Population:
    """One token kind at one block over the reference set: ``samples`` (N, S, D), N reference images (or,
    for outliers, N outlier tokens), S slots (one per register; 1 for CLS and outliers), and their per-slot,
    per-channel mean and std (S, D)."""

    samples: Tensor
    mean: Tensor = field(init=False)
    std: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.mean = self.samples.mean(0)
        self.std = self.samples.std(0, correction=0)


@dataclass
class ReferenceStats:
    """Each target's population at each edited block; outliers only at the blocks where the reference set
    has some (the fitted ``thresholds`` are reported for every block, ``inf`` meaning none)."""

    block_indices: list[int]
    num_images: int
    registers: dict[int, Population]
    cls: dict[int, Population]
    outliers: dict[int, Population]
    thresholds: dict[int, float]

    def populations(self, target: str) -> dict[int, Population]:
        return {"registers": self.registers, "cls": self.cls, "outliers": self.outliers}[target]

    def sizes(self) -> dict[str, Any]:
        return {
            "reference_images": self.num_images,
            "outlier_tokens": {b: int(p.samples.shape[0]) for b, p in self.outliers.items()},
            "outlier_thresholds": {b: (None if math.isinf(t) else t) for b, t in self.thresholds.items()},
        }


@torch.no_grad()
def reference_statistics(
    model: nn.Module,
    batches: Iterable[Tensor],
    blocks: Sequence[int],
    *,
    detector: str = "valley",
    cutoff: float | None = None,
) -> ReferenceStats:
    """The populations of every target at ``blocks`` (resolved indices) over normalised image ``batches``,
    from the unedited model. Two passes: patch norms fit each block's outlier threshold, then the tokens
    above it are gathered (so no block's patch tokens are held for the whole set)."""
    device = next(model.parameters()).device
    batches = [x.to(device) for x in batches]
    if not batches:
        raise ValueError("ablate: the reference set is empty (data.train gave no image)")
    layout: TokenLayout = model.layout
    wanted, upto = set(blocks), max(blocks) + 1
    cls: dict[int, list[Tensor]] = {b: [] for b in blocks}
    registers: dict[int, list[Tensor]] = {b: [] for b in blocks}
    norms: dict[int, list[Tensor]] = {b: [] for b in blocks}
    for x in batches:
        for layer in model.iter_layers(x, upto=upto):
            b = layer.index - 1
            if b in wanted:
                tokens = layer.tokens.float()
                cls[b].append(tokens[:, :1])
                registers[b].append(layout.registers(tokens))
                norms[b].append(layout.patches(tokens).norm(dim=-1))
    thresholds = {b: float(outlier_threshold(torch.cat(norms[b]).cpu(), detector, cutoff=cutoff)) for b in blocks}
    outliers: dict[int, list[Tensor]] = {b: [] for b in blocks if not math.isinf(thresholds[b])}
    if outliers:
        for x in batches:
            for layer in model.iter_layers(x, upto=max(outliers) + 1):
                b = layer.index - 1
                if b in outliers:
                    patches = layout.patches(layer.tokens.float())
                    outliers[b].append(patches[patches.norm(dim=-1) > thresholds[b]])
    found = {b: torch.cat(t)[:, None] for b, t in outliers.items() if sum(len(x) for x in t)}
    return ReferenceStats(
        block_indices=list(blocks),
        num_images=sum(len(x) for x in batches),
        registers={b: Population(torch.cat(t)) for b, t in registers.items() if layout.num_registers},
        cls={b: Population(torch.cat(t)) for b, t in cls.items()},
        outliers={b: Population(t) for b, t in found.items()},
        thresholds=thresholds,
    )


# ---------------------------------------------------------------- the replacements
def replacement_tokens(
    kind: str, population: Population, count: int, generator: torch.Generator, picks: Tensor | None = None
) -> Tensor:
    """(count, S, D) tokens that replace ``count`` items of ``population``'s kind (images for registers and
    CLS, tokens for outliers). ``picks``: the reference samples ``shuffle`` takes (drawn when None)."""
    slots, dim = population.mean.shape
    if kind == "zero":
        return population.mean.new_zeros(count, slots, dim)
    if kind == "mean":
        return population.mean.expand(count, slots, dim).clone()
    if kind == "noise":
        draw = torch.randn(count, slots, dim, generator=generator).to(population.mean.device)
        return population.mean + population.std * draw
    if kind == "shuffle":
        if picks is None:
            picks = torch.randint(len(population.samples), (count,), generator=generator)
        return population.samples[picks.to(population.samples.device)]
    raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {kind!r}")


class ReferenceDraws:
    """The reference image each image of the running batch takes its tokens from (``shuffle``): drawn afresh
    at the first edited block of every forward and kept for its later blocks, so one image's registers (or
    CLS) come from one reference image throughout."""

    def __init__(self, num_reference: int, first_block: int, generator: torch.Generator) -> None:
        self.num_reference, self.first_block, self.generator = num_reference, first_block, generator
        self.picks: Tensor | None = None

    def for_block(self, block: int, batch: int) -> Tensor:
        if block == self.first_block or self.picks is None or len(self.picks) != batch:
            self.picks = torch.randint(self.num_reference, (batch,), generator=self.generator)
        return self.picks


def ablation_edits(layout: TokenLayout, target: str, kind: str, stats: ReferenceStats, seed: int = 0) -> dict[int, Any]:
    """``{block: edit}`` for ``model.edit(outputs=...)``: ``target``'s tokens replaced the ``kind`` way at
    every block that has a population of it. The draws are seeded, so a run is reproducible."""
    populations = stats.populations(target)
    if not populations:
        raise ValueError(
            f"ablate: nothing to replace for target {target!r}: no population of it at the edited blocks "
            "(a model without registers, or no reference outliers); check missing_target first"
        )
    generator = torch.Generator().manual_seed(seed)
    edits = {}
    if target in ("registers", "cls"):
        span = layout.registers_slice if target == "registers" else slice(0, 1)
        first = min(populations)
        draws = ReferenceDraws(stats.num_images, first, generator)

        def slot_edit(tokens: Tensor, block: int) -> Tensor:
            population = populations[block]
            picks = draws.for_block(block, len(tokens)) if kind == "shuffle" else None
            out = tokens.clone()
            out[:, span] = replacement_tokens(kind, population, len(tokens), generator, picks).to(out)
            return out

        for block in populations:
            edits[block] = lambda tokens, block=block: slot_edit(tokens, block)
        return edits

    def outlier_edit(tokens: Tensor, block: int) -> Tensor:
        mask = layout.patches(tokens).float().norm(dim=-1) > stats.thresholds[block]  # (B, P)
        count = int(mask.sum())
        if not count:
            return tokens
        out = tokens.clone()
        patches = layout.patches(out)  # a view: writing it writes ``out``
        patches[mask] = replacement_tokens(kind, populations[block], count, generator)[:, 0].to(out)
        return out

    for block in populations:
        edits[block] = lambda tokens, block=block: outlier_edit(tokens, block)
    return edits


def missing_target(target: str, stats: ReferenceStats, layout: TokenLayout, detector: str) -> str | None:
    """Why ``target`` cannot be ablated here (a note), or None."""
    if target == "registers" and not layout.num_registers:
        return "registers: the model has no register tokens; skipped"
    if target == "outliers" and not stats.outliers:
        return (
            f"outliers: no reference patch token above the {detector} threshold at any ablated block "
            f"{stats.block_indices}; skipped"
        )
    return None


# ---------------------------------------------------------------- the task
def reference_batches(
    loaded: LoadedBackbone, inputs: MetricInputs, settings: AblateSettings
) -> tuple[list[Tensor], int]:
    """The first ``settings.reference_images`` of ``data.train`` (every process the same ones), normalised, at
    the evaluation resolution: kNN's bank and the linear probe's training images, never the scored images."""
    data = inputs.data
    resolution = eval_resolution(data.resolution, loaded)
    images = LabelledImages(
        data.train,
        eval_transform(resolution),
        limit=settings.reference_images,
        split="train",
        synthetic=synthetic_options(data) if data.train == "synthetic" else None,
        seed=inputs.seed,
    )
    loader = DataLoader(images, batch_size=settings.batch_size, num_workers=0, collate_fn=collate_labelled)
    return [x for x, _, _ in loader], resolution


def change(value: Any, baseline: Any) -> float | None:
    """value - baseline for two numbers; None when either is missing (e.g. no emergence layer)."""
    numeric = all(isinstance(v, Real) and not isinstance(v, bool) for v in (value, baseline))
    if not numeric or not all(math.isfinite(float(v)) for v in (value, baseline)):
        return None
    return float(value) - float(baseline)


def run_ablate(
    loaded: LoadedBackbone, inputs: MetricInputs, settings: AblateSettings, out_dir: str | os.PathLike
) -> dict:
    """Baseline and one row per (target, replacement): the headline numbers and their change vs the
    baseline; the reference statistics' sizes and thresholds; notes on skipped targets. The evaluations'
    own files go under ``<out_dir>/ablate/``."""
    model = loaded.model
    metrics = check_metrics(settings.metrics, "ablate.metrics")
    if settings.layers is None:
        blocks = list(range(model.n_blocks))
    else:
        blocks = sorted({model.resolve_block(b, "ablate.layers") for b in settings.layers})
    batches, resolution = reference_batches(loaded, inputs, settings)
    cutoff = settings.fixed_cutoff
    stats = reference_statistics(model, batches, blocks, detector=settings.detector, cutoff=cutoff)
    work = Path(out_dir) / "ablate"
    log.info("ablate: baseline (%s)", ", ".join(metrics))
    baseline, _ = headline_numbers(loaded, metrics, inputs, work)
    rows, notes = [], []
    for target in settings.targets:
        note = missing_target(target, stats, model.layout, settings.detector)
        if note:
            notes.append(note)
            continue
        if target == "outliers" and len(stats.outliers) < len(blocks):
            quiet = [b for b in blocks if b not in stats.outliers]
            notes.append(f"outliers: none in the reference set at blocks {quiet}; those blocks are not edited")
        for kind in settings.replacements:
            log.info("ablate: %s -> %s at %d block(s)", target, kind, len(stats.populations(target)))
            with model.edit(outputs=ablation_edits(model.layout, target, kind, stats, settings.seed)):
                numbers, _ = headline_numbers(loaded, metrics, inputs, work)
            delta = {key: change(numbers.get(key), value) for key, value in baseline.items()}
            rows.append({"target": target, "replacement": kind, "numbers": numbers, "change": delta})
    result = {
        "metrics": metrics,
        "blocks": blocks,
        "resolution": resolution,
        "reference": {"source": inputs.data.train, **stats.sizes()},
        "baseline": baseline,
        "rows": rows,
        "notes": notes,
    }
    if rank_and_world()[0] == 0 and rows:
        result["plot"] = str(plot_ablation(result, Path(out_dir) / "ablate.png"))
    return result


# ---------------------------------------------------------------- the picture
def plotted_numbers(result: dict) -> list[str]:
    """The headline numbers with at least one change to show, in the baseline's order."""
    return [k for k in result["baseline"] if any(row["change"].get(k) is not None for row in result["rows"])]


def plot_ablation(result: dict, path: str | os.PathLike) -> Path:
    """PNG at ``path``: one panel per headline number, grouped bars of the change vs the baseline, one
    group per target and one bar per replacement."""
    from vitreg.utils import figures  # matplotlib is imported only when plotting

    keys = plotted_numbers(result) or list(result["baseline"])[:1]
    targets = list(dict.fromkeys(row["target"] for row in result["rows"]))
    kinds = list(dict.fromkeys(row["replacement"] for row in result["rows"]))
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = figures.new_figure(3.6 * columns, 2.8 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    width = 0.8 / len(kinds)
    colours = {"zero": "tab:red", "mean": "tab:blue", "noise": "tab:green", "shuffle": "tab:purple"}
    for ax, key in zip(axes, keys, strict=False):
        for i, kind in enumerate(kinds):
            heights = []
            for target in targets:
                match = [r for r in result["rows"] if r["target"] == target and r["replacement"] == kind]
                value = match[0]["change"].get(key) if match else None
                heights.append(math.nan if value is None else value)
            offsets = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(targets))]
            ax.bar(offsets, heights, width, color=colours.get(kind), label=kind)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(range(len(targets)), targets, fontsize=8)
        base = result["baseline"].get(key)
        ax.set_title(f"{key} (baseline {base:.4g})" if isinstance(base, Real) else key, fontsize=8)
        ax.set_ylabel("change vs baseline", fontsize=7)
    for ax in axes[len(keys) :]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7)
    return figures.save(fig, path)


__all__ = [
    "REPLACEMENTS",
    "TARGETS",
    "AblateSettings",
    "Population",
    "ReferenceStats",
    "ablation_edits",
    "plot_ablation",
    "reference_statistics",
    "replacement_tokens",
    "run_ablate",
]

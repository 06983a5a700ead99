"""``task=ttr``: test-time registers (Jiang et al. 2025) on any checkpoint, before and after, with the same metrics.

The register neurons come from a ``task=register_neurons`` result (``ttr.neurons``) or are found now on the
probe images; ``vitreg.models.TestTimeRegisters`` moves them into extra tokens. The plain model, its TTR
version and, when given, a checkpoint trained with registers (``compare=``) are then measured alike
(``vitreg.eval.compare``), and one picture shows their last-layer norm and CLS attention maps side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitreg.data.probe import probe_tensor
from vitreg.eval.compare import MetricInputs, check_metrics, headline_numbers, raw_probe
from vitreg.eval.register_neurons import RegisterNeuronSettings, find_register_neurons
from vitreg.models import TestTimeRegisters, TestTimeRegisterSettings
from vitreg.models.export import export_backbone
from vitreg.models.load import LoadedBackbone
from vitreg.utils.distributed import rank_and_world


@dataclass
class TTRSettings:
    """The ``ttr`` section of conf/analyze.yaml."""

    neurons: str | None = None  # a register_neurons.json (task=register_neurons); null: find them now
    num_tokens: int = 1  # test-time registers added
    scale: float = 1.0  # their activation: scale x the signed max of the register neurons over all tokens
    patch_values: str = "zero"  # the neurons on the patches: zero (the paper's) | mean | only_outliers | same
    metrics: list[str] = field(default_factory=lambda: ["telemetry", "knn", "lost", "local"])  # of compare.METRICS
    export: bool = False  # also write the TTR backbone (DINOv2 .pth + vitreg_export.json with the neurons)

    def __post_init__(self) -> None:
        check_metrics(self.metrics, "ttr.metrics")
        _ = self.model_settings  # checks num_tokens and patch_values

    @property
    def model_settings(self) -> TestTimeRegisterSettings:
        return TestTimeRegisterSettings(num_tokens=self.num_tokens, scale=self.scale, patch_values=self.patch_values)


def read_neurons(path: str | os.PathLike) -> list[dict]:
    """The neurons of a ``register_neurons.json`` (or of a ``ttr.json``, which repeats them)."""
    try:
        payload = json.loads(Path(path).read_text())
        neurons = payload["result"]["neurons"]
        return [{"layer": int(n["layer"]), "neuron": int(n["neuron"])} for n in neurons]
    except FileNotFoundError:
        raise ValueError(f"no file at {path}; run task=register_neurons first") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not the JSON of task=register_neurons (result.neurons: [{{layer, neuron}}, ...]): {err}"
        ) from None


def run_ttr(
    loaded: LoadedBackbone,
    settings: TTRSettings,
    detection: RegisterNeuronSettings,
    inputs: MetricInputs,
    out_dir: str | os.PathLike,
    compare: LoadedBackbone | None = None,
) -> dict:
    """The plain model, its TTR version and ``compare`` measured alike; the picture goes to ``<out>/ttr.png``."""
    out = Path(out_dir)
    raw, resolution = raw_probe(loaded, inputs)  # the detection's images and the picture's
    if settings.neurons is not None:
        neurons, found = read_neurons(settings.neurons), {"from": str(settings.neurons)}
    else:
        found = find_register_neurons(loaded.model, probe_tensor(raw, resolution).to(inputs.device), detection)
        neurons = found.pop("neurons")
    ttr = TestTimeRegisters.from_backbone(loaded.model, neurons, settings.model_settings)
    versions = {"plain": loaded, "ttr": dataclasses.replace(loaded, model=ttr)}
    if compare is not None:
        versions["compare"] = compare
    numbers, maps = {}, {}
    for name, version in versions.items():
        numbers[name], maps[name] = headline_numbers(version, settings.metrics, inputs, out / "ttr_files" / name)
    result: dict[str, Any] = {
        "neurons": neurons,
        "num_test_time_registers": ttr.num_test_time_registers,
        "detection": found,
        "metrics": numbers,
    }
    if not ttr.neurons:
        result["note"] = "no register neurons: the TTR model is the plain one (no token added)"
    main = rank_and_world()[0] == 0
    if main and "telemetry" in settings.metrics:
        result["plot"] = str(plot_ttr(maps, raw, out / "ttr.png"))
    if main and settings.export:
        exported = export_backbone(
            ttr, "dinov2", out / "ttr_backbone.pth", source={"kind": loaded.source, "step": loaded.step}
        )
        result["export"] = str(exported.path)
    return result


def plot_ttr(maps: dict[str, dict[str, np.ndarray]], raw_images, path: Path) -> Path:
    """One row per probe image: the image, then each version's last-layer patch norms (one colour scale per
    row, so lower is lower) and its CLS attention over the patches."""
    from vitreg.telemetry.plots import images_hwc, show_image, show_map
    from vitreg.utils.figures import close, new_figure, save

    names = list(maps)
    rows = min(len(m.get("norm", [])) for m in maps.values())
    with_attention = all("cls_attention" in m for m in maps.values())
    columns = 1 + len(names) * (2 if with_attention else 1)
    fig = new_figure(1.3 * columns, 1.35 * max(rows, 1))
    axes = fig.subplots(max(rows, 1), columns, squeeze=False)
    images = images_hwc(raw_images, rows)
    for r in range(rows):
        show_image(axes[r][0], images[r], "image" if r == 0 else None)
        top = max(float(maps[name]["norm"][r].max()) for name in names)
        for i, name in enumerate(names):
            show_map(axes[r][1 + i], maps[name]["norm"][r], f"norm: {name}" if r == 0 else None, vmin=0.0, vmax=top)
            if with_attention:
                title = f"CLS attn: {name}" if r == 0 else None
                show_map(axes[r][1 + len(names) + i], maps[name]["cls_attention"][r], title, cmap="viridis")
        axes[r][len(names)].figure.colorbar(
            axes[r][len(names)].images[0], ax=axes[r][len(names)], fraction=0.08, pad=0.02, format="%.0f"
        ).ax.tick_params(labelsize=5, length=1.5, pad=1)
    try:
        return save(fig, path)
    finally:
        close(fig)

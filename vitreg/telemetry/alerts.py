"""When a telemetry record is worth telling someone about: the first emergence of high-norm artifacts
and the headline detector's last-layer outlier fraction crossing a threshold.

Pure decisions over records; the callback (``vitreg.lit.telemetry``) sends them as W&B alerts and
log warnings and remembers which fired, so each condition fires once per run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Alert:
    key: str  # "<condition>/<model>/r<resolution>": what has fired, kept across resumes
    title: str
    text: str


def due_alerts(
    record: dict, outlier_fraction: float | None, fired: set[str] | frozenset[str] = frozenset()
) -> list[Alert]:
    """The alerts ``record`` triggers that are not in ``fired``.

    ``emergence``: the headline detector found an emergence layer. ``outlier_fraction``: its
    last-layer patch outlier fraction is at least ``outlier_fraction`` (None: never)."""
    detector, model, res, step = record["detector"], record["model"], record["resolution"], record["step"]
    where = f"{model}/r{res}"
    alerts = []
    layer = record["emergence_layer"].get(detector)
    if layer is not None:
        fraction = record["outliers"][detector]["patch_fraction"][layer]
        alerts.append(
            Alert(
                f"emergence/{where}",
                f"High-norm artifacts emerged ({where})",
                f"step {step}: the {detector} detector finds high-norm patch tokens from layer {layer} on "
                f"({fraction:.2%} of probe patches at that layer) in the {model} at {res}px.",
            )
        )
    last = record["outliers"][detector]["patch_fraction"][-1]
    if outlier_fraction is not None and last is not None and last >= outlier_fraction:
        alerts.append(
            Alert(
                f"outlier_fraction/{where}",
                f"Outlier fraction above {outlier_fraction:g} ({where})",
                f"step {step}: {last:.2%} of the last layer's probe patches are {detector} outliers in the {model} "
                f"at {res}px (callbacks.telemetry.alert_outlier_fraction={outlier_fraction:g}).",
            )
        )
    return [a for a in alerts if a.key not in fired]

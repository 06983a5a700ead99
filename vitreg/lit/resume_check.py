"""Resume refuses what it cannot continue: the checkpoint's config against the new one, at start.

A checkpoint stores the resolved config it was trained with (``hyper_parameters.cfg``). Resuming with
another batch size, seed, data source, model or objective would silently continue a different
experiment under the old run's name, so those changes refuse with a diff and the ways out. Changes
that do not alter what is computed (logging cadence, ``max_steps``, checkpoint cadence, loggers,
paths, probes, loader workers) are allowed and logged. ``resume_allow_changes`` lets a user accept
named keys deliberately (shards moved to another filesystem, say).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# Keys (dotted prefixes) whose change makes the resumed run a different experiment.
MEANINGFUL = ("model.", "augment.", "ssl.", "optim.", "data.", "seed", "registers")
# ... except these, which change how the run is executed or watched, not what it computes.
HARMLESS = (
    "model.pretrained_weights",  # only read when a fresh run initialises its student
    "model.attn_backend",  # the same attention, computed by another kernel
    "optim.fused",  # the same AdamW, computed by another kernel
    "ssl.ibot.pad_masked_tokens",  # the same iBOT loss, up to fp32 summation order
    "data.num_workers",  # exact resume checks the worker count itself (data.exact_resume)
    "data.exact_resume",
    "data.webdataset.max_skip_fraction",
    "data.webdataset.min_samples_before_abort",
    "data.webdataset.max_unusable_in_a_row",
    "data.webdataset.missing_shards",
    "data.synthetic.knn_train_images",  # probe pools, not training data
    "data.synthetic.knn_val_images",
    "ssl.on_nonfinite",
    "ssl.max_skipped_steps",
)


class ResumeConfigError(RuntimeError):
    """The run would resume with a config that changes what it computes."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else f"{p}.") for p in patterns)


def is_meaningful(key: str, allowed: Iterable[str] = ()) -> bool:
    """Whether changing ``key`` on resume changes the experiment (and is not explicitly allowed)."""
    return _matches(key, MEANINGFUL) and not _matches(key, HARMLESS) and not _matches(key, allowed)


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, new value)`` for the keys present in both configs that differ."""
    a, b = flatten(saved), flatten(new)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def check_resume_config(
    saved: Mapping[str, Any] | None, new: Mapping[str, Any], checkpoint: str, allowed: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Refuse (``ResumeConfigError`` with a diff and the ways out) when ``new`` changes a meaningful key
    of the checkpoint's config ``saved``; log and return the harmless changes. Keys this version added
    since the checkpoint was written take their value from ``new`` (logged)."""
    if saved is None:
        log.warning("%s records no config (not written by vitreg's pretrain): resuming without comparing", checkpoint)
        return {}
    allowed = list(allowed)
    changes = config_changes(saved, new)
    refused = {k: v for k, v in changes.items() if is_meaningful(k, allowed)}
    if refused:
        diff = "\n".join(f"  {k}: {old!r} -> {now!r}" for k, (old, now) in refused.items())
        keys = ",".join(refused)
        raise ResumeConfigError(
            f"refusing to resume from {checkpoint}: the config changes what this run computes:\n{diff}\n"
            "Put the old values back to continue it; or start a new run with run_name=<new name> (or resume=never "
            f"to start afresh in this run directory); or accept the change deliberately with "
            f"'resume_allow_changes=[{keys}]'."
        )
    accepted = {k: v for k, v in changes.items() if k not in refused}
    for key, (old, now) in accepted.items():
        log.info("resume: %s changed from %r to %r", key, old, now)
    added = sorted(flatten(new).keys() - flatten(saved).keys())
    if added:
        log.info("resume: options newer than the checkpoint take this version's values: %s", ", ".join(added))
    return accepted

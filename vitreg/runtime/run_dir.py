"""Deterministic run directories: the same on every rank and on every restart of a job.

A run directory holds the checkpoints, the W&B id and the logs of one training run, so a job
that restarts (a SLURM requeue, a manual resubmit) must land in the same one. It is therefore
derived from the configuration and the SLURM array ids only, never from a timestamp or a pid:

====================================  ==================================================================
situation                             run directory
====================================  ==================================================================
SLURM array task (``sbatch --array``)  ``<output_root>/<run_name>/array<ARRAY_JOB_ID>_<TASK_ID>-<overrides>``
``run_id=<id>``                        ``<output_root>/<run_name>/<id>``
Hydra multirun (``-m``)                ``<output_root>/<run_name>[/<run_id>]/<overrides>``
otherwise                              ``<output_root>/<run_name>``
====================================  ==================================================================

``<overrides>`` is Hydra's ``override_dirname`` (``registers=4``), so the name says which point of
a sweep it is. When it would be too long for one path component it keeps the headline keys
(``registers``, ``model``) and a hash of the rest. Hydra calls these functions through the
``vitreg.run_dir`` / ``vitreg.sweep_dir`` resolvers of ``conf/hydra/default.yaml``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping

from omegaconf import OmegaConf

from vitreg.config import validate_run_name

# Overrides that stay readable when an override_dirname has to be shortened.
HEADLINE_KEYS = ("registers", "model")
# A path component longer than this is shortened (filesystems allow 255 bytes; leave room for suffixes).
MAX_COMPONENT_BYTES = 160


def slurm_array_ids(env: Mapping[str, str]) -> tuple[str, str] | None:
    """``(SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID)`` of an array task, else None."""
    job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if job and task:
        return job, task
    return None


def _override_items(override_dirname: str, key: str) -> list[str]:
    """The ``key=value`` items of an override_dirname (``a=1,b=[1,2]``) whose key is ``key``."""
    return re.findall(rf"(?:^|,)((?:\+\+|\+|~)?{re.escape(key)}=(?:\[[^\]]*\]|[^,]*))", override_dirname)


def shorten_overrides(override_dirname: str, max_bytes: int = MAX_COMPONENT_BYTES) -> str:
    """``override_dirname`` itself when it fits one path component, else the headline overrides plus
    a hash of the whole string (deterministic: the same overrides always give the same name)."""
    name = override_dirname.replace("/", "_")  # values such as paths must not create subfolders
    if len(name.encode()) <= max_bytes:
        return name
    keep = [item for key in HEADLINE_KEYS for item in _override_items(name, key)]
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return ",".join([*keep, f"overrides-{digest}"])


def resolve_run_dir(
    env: Mapping[str, str],
    *,
    output_root: str,
    run_name: str,
    run_id: str | None = None,
    override_dirname: str = "",
    multirun: bool = False,
) -> str:
    """The run directory of a job (see the module docstring for the table).

    ``env`` is the process environment (``os.environ``); only the SLURM array variables are read,
    which srun gives every rank of a task and a requeued task keeps, so all ranks and all restarts
    agree. ``multirun``: a Hydra ``-m`` job, whose directory is the sweep dir plus its overrides.
    """
    base = f"{output_root}/{run_name}"
    overrides = shorten_overrides(override_dirname) if override_dirname else ""
    if multirun:
        sweep = f"{base}/{run_id}" if run_id else base
        return f"{sweep}/{overrides}" if overrides else sweep
    array = slurm_array_ids(env)
    if array:
        name = f"array{array[0]}_{array[1]}"
        return f"{base}/{name}-{overrides}" if overrides else f"{base}/{name}"
    if run_id:
        return f"{base}/{run_id}"
    return base


def _validate_run_id(run_id: str | None) -> str | None:
    if run_id is None or run_id == "":
        return None
    run_id = str(run_id)
    if "/" in run_id or run_id in (".", ".."):
        raise ValueError(f"run_id must be a single directory name, got {run_id!r}")
    return run_id


def _run_dir_resolver(output_root: str, run_name: str, run_id: str | None, override_dirname: str | None) -> str:
    validate_run_name(run_name)  # before Hydra creates the directory, outside output_root if it escapes
    return resolve_run_dir(
        os.environ,
        output_root=str(output_root),
        run_name=str(run_name),
        run_id=_validate_run_id(run_id),
        override_dirname=override_dirname or "",
    )


def _sweep_dir_resolver(output_root: str, run_name: str, run_id: str | None) -> str:
    validate_run_name(run_name)
    return resolve_run_dir(
        os.environ, output_root=str(output_root), run_name=str(run_name), run_id=_validate_run_id(run_id), multirun=True
    )


def _overrides_resolver(override_dirname: str | None) -> str:
    return shorten_overrides(override_dirname) if override_dirname else ""


def register_resolvers() -> None:
    """Register ``vitreg.run_dir``, ``vitreg.sweep_dir`` and ``vitreg.overrides`` with OmegaConf
    (idempotent); ``conf/hydra/default.yaml`` uses them for ``hydra.run.dir``, ``hydra.sweep.dir``
    and ``hydra.sweep.subdir``, so Hydra's directories are exactly ``resolve_run_dir``'s."""
    OmegaConf.register_new_resolver("vitreg.run_dir", _run_dir_resolver, replace=True, use_cache=False)
    OmegaConf.register_new_resolver("vitreg.sweep_dir", _sweep_dir_resolver, replace=True, use_cache=False)
    OmegaConf.register_new_resolver("vitreg.overrides", _overrides_resolver, replace=True, use_cache=False)


__all__ = ["register_resolvers", "resolve_run_dir", "shorten_overrides", "slurm_array_ids"]

"""Where ``train/analyze.py`` writes the reports of a checkpoint, so that later reports never overwrite earlier ones.

A checkpoint of a vitreg run (``<run_dir>/checkpoints/<name>``) gets ``<run_dir>/analysis/step<0000000>/``,
named by the step stored inside the checkpoint: ``last.ckpt`` holds a different state every time the run
goes on, so a folder named after the file would be overwritten. ``analysis/last`` is a symlink to the
newest step folder, replaced atomically after each report. Any other file gets ``outputs/analysis/<stem>/``.

Earlier versions wrote ``analysis/<checkpoint stem>/`` (``analysis/last/`` for ``last.ckpt``).
``report_folders`` lists those too; a real ``analysis/last/`` folder is renamed to its step folder (the step
is read from its reports) the first time a new report links ``last``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from pathlib import Path

from vitreg.utils.io import checkpoint_step, fsync_directory

log = logging.getLogger(__name__)

STEP_DIR = "step{step:07d}"  # the step checkpoints' names (step0001250.ckpt): the same step, the same name
STEP_NAME = re.compile(r"^step(\d+)$")
LAST = "last"
LEGACY_LAST = "last-legacy"  # a pre-link analysis/last/ whose step cannot be read


def step_folder_name(step: int) -> str:
    return STEP_DIR.format(step=int(step))


def run_checkpoint_step(checkpoint: Path) -> int | None:
    """The step stored in a run's checkpoint (file or sharded directory), or None when it cannot be read
    (then the task's own loading says why)."""
    try:
        return checkpoint_step(checkpoint)
    except Exception:  # unreadable, foreign layout: fall back to the file name
        return None


def default_report_dir(checkpoint: str | os.PathLike) -> Path:
    """``<run_dir>/analysis/step<N>`` for a vitreg run's checkpoint, else ``outputs/analysis/<stem>``."""
    path = Path(checkpoint)
    if path.parent.name != "checkpoints":
        return Path("outputs") / "analysis" / path.stem
    analysis = path.parent.parent / "analysis"
    step = run_checkpoint_step(path)
    return analysis / (step_folder_name(step) if step is not None else path.stem)


def _step_of_reports(folder: Path) -> int | None:
    """The checkpoint step recorded in a report folder's JSON files (task results and telemetry reports)."""
    for report in sorted(folder.glob("*.json")) + sorted(folder.glob("r*/report.json")):
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        for record in (data, data.get("record") or {} if isinstance(data, dict) else {}):
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int):
                return step
    return None


def _migrate_legacy_last(analysis: Path) -> None:
    """A real ``analysis/last/`` folder (written before the link existed) moves to its step folder (or to
    ``last-legacy`` when its step is unknown or taken), so the link can take its name and nothing is lost."""
    last = analysis / LAST
    if last.is_symlink() or not last.is_dir():
        return
    step = _step_of_reports(last)
    target = analysis / (step_folder_name(step) if step is not None else LEGACY_LAST)
    if target.exists():
        target = analysis / LEGACY_LAST
    if target.exists():
        log.warning("analysis: %s is an old report folder and %s exists; leaving it (no `last` link)", last, target)
        return
    os.replace(last, target)
    log.warning("analysis: moved the old report folder %s to %s (reports are now named by step)", last, target)


def step_folders(analysis: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the step-named report folders in ``analysis``, oldest first."""
    analysis = Path(analysis)
    if not analysis.is_dir():
        return []
    found = []
    for child in analysis.iterdir():
        match = STEP_NAME.match(child.name)
        if match and child.is_dir() and not child.is_symlink():
            found.append((int(match.group(1)), child))
    return sorted(found)


def link_last(report_dir: str | os.PathLike) -> Path | None:
    """Point ``analysis/last`` at the newest step folder (by step, not by time), replacing the link
    atomically (a reader sees the old or the new target, never none). No-op outside a run's ``analysis``
    folder. Returns the link, or None."""
    report_dir = Path(report_dir)
    analysis = report_dir.parent
    if analysis.name != "analysis" or not STEP_NAME.match(report_dir.name):
        return None
    _migrate_legacy_last(analysis)
    folders = step_folders(analysis)
    if not folders:
        return None
    link = analysis / LAST
    if link.exists() and not link.is_symlink():
        return None  # an old folder that could not be moved (warned above)
    newest = folders[-1][1].name
    tmp = analysis / f".{LAST}.{secrets.token_hex(4)}.tmp"
    os.symlink(newest, tmp)  # relative: the run directory can be moved or copied
    os.replace(tmp, link)
    fsync_directory(analysis)
    return link


def report_folders(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Every report folder of a run by name: the step folders, and folders of earlier versions
    (``<checkpoint stem>``, an old real ``last``); ``last`` as a link is left out (it repeats a step folder)."""
    analysis = Path(run_dir) / "analysis"
    if not analysis.is_dir():
        return {}
    return {
        child.name: child
        for child in sorted(analysis.iterdir())
        if child.is_dir() and not child.is_symlink() and not child.name.startswith(".")
    }


def latest_report(run_dir: str | os.PathLike) -> Path | None:
    """The newest report folder of a run: the ``last`` link's target, else the highest step folder, else an
    old ``analysis/last/`` folder; None when the run has no reports."""
    analysis = Path(run_dir) / "analysis"
    link = analysis / LAST
    if link.is_symlink() and link.is_dir():
        return link.resolve()
    folders = step_folders(analysis)
    if folders:
        return folders[-1][1]
    return link if link.is_dir() else None

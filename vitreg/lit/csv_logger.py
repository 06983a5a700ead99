"""A CSV logger that keeps the rows of earlier runs in the same run directory.

Lightning's CSVLogger deletes ``metrics.csv`` when a run restarts in the same folder, so a requeued
or resumed run would lose its history. Here the file is kept and appended to; rows from steps at or
after the checkpoint being resumed (logged before a crash, then run again) are dropped once, so
every step appears once.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, drop_from_step: int | None) -> None:
        self._drop_from_step = drop_from_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here; keep it instead
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
        if self._drop_from_step is not None:
            kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < self._drop_from_step]
            if len(kept) != len(rows):
                with open(self.metrics_file_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=header)
                    writer.writeheader()
                    writer.writerows(kept)
        self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives restarts (see the module docstring)."""

    def __init__(self, *args, drop_from_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._drop_from_step = drop_from_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._drop_from_step)
        return self._experiment

"""Lightning callbacks of the pretraining run (the online probes are in ``vitreg.lit.probes``)."""

from __future__ import annotations

import lightning as L


def is_logging_step(trainer: L.Trainer | None) -> bool:
    """Whether what this step logs reaches the loggers (every ``trainer.log_every_n_steps``; no trainer:
    always). Each logged Python number becomes a device tensor (a blocking host-to-device copy), so
    values the loggers would never see are not logged. Lightning's own test, constant through a batch."""
    return trainer is None or trainer._logger_connector.should_update_logs


class DataHealth(L.Callback):
    """Counts what the data pipeline skipped (``batch["skipped"]``, by reason), logs it as
    ``data/skipped/<reason>`` and ``data/skip_fraction``, and stops the run with a clear message
    when the skipped fraction passes ``max_skip_fraction`` (after ``min_samples`` samples)."""

    def __init__(self, max_skip_fraction: float = 0.05, min_samples: int = 1000) -> None:
        self.max_skip_fraction = max_skip_fraction
        self.min_samples = min_samples
        self.skipped: dict[str, int] = {}
        self.seen = 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not isinstance(batch, dict) or "skipped" not in batch:
            return
        for reason, n in batch["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
        self.seen += int(batch.get("seen", 0))
        sample_skips = sum(n for r, n in self.skipped.items() if not r.startswith("shard_"))
        fraction = sample_skips / max(self.seen, 1)
        if is_logging_step(trainer):  # running totals: the steps between lose nothing
            metrics = {f"data/skipped/{r}": float(n) for r, n in self.skipped.items()}
            metrics["data/skip_fraction"] = fraction
            module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self.seen >= self.min_samples and fraction > self.max_skip_fraction:
            raise RuntimeError(
                f"{fraction:.1%} of the {self.seen} samples read were unusable ({self.skipped}), above "
                f"data.webdataset.max_skip_fraction={self.max_skip_fraction}; check the shards or raise the bound"
            )

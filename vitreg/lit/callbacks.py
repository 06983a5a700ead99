"""Lightning callbacks of the pretraining run."""

from __future__ import annotations

import logging

import lightning as L

from vitreg.eval.knn import extract_features, knn_accuracy

log = logging.getLogger(__name__)


class KNNProbe(L.Callback):
    """kNN top-1 of the teacher's CLS features on held-out labelled images, at fit start and end.

    Measures whether self-supervised training learned anything: it must rise clearly above chance.
    ``results`` holds ``{"before": acc, "after": acc}`` (0–1).
    """

    def __init__(self, loaders_fn, k: int = 20, temperature: float = 0.07, chance: float | None = None) -> None:
        self.loaders_fn = loaders_fn
        self.k = k
        self.temperature = temperature
        self.chance = chance
        self.results: dict[str, float] = {}

    def _measure(self, trainer: L.Trainer, module: L.LightningModule, when: str) -> None:
        bank, queries = self.loaders_fn()
        backbone = module.teacher.backbone
        train_feats, train_labels = extract_features(backbone, bank, module.device)
        test_feats, test_labels = extract_features(backbone, queries, module.device)
        acc = knn_accuracy(train_feats, train_labels, test_feats, test_labels, self.k, self.temperature)
        self.results[when] = acc
        chance = f" (chance {self.chance:.1%})" if self.chance else ""
        log.info("kNN top-1 of the teacher %s training: %.1f%%%s", when, 100 * acc, chance)
        for logger in trainer.loggers:
            logger.log_metrics({f"knn/top1_{when}": acc}, step=trainer.global_step)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._measure(trainer, module, "before")

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._measure(trainer, module, "after")


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
        metrics = {f"data/skipped/{r}": float(n) for r, n in self.skipped.items()}
        metrics["data/skip_fraction"] = fraction
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self.seen >= self.min_samples and fraction > self.max_skip_fraction:
            raise RuntimeError(
                f"{fraction:.1%} of the {self.seen} samples read were unusable ({self.skipped}), above "
                f"data.webdataset.max_skip_fraction={self.max_skip_fraction}; check the shards or raise the bound"
            )

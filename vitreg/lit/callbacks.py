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

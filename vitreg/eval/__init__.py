"""Evaluation of backbones: kNN on frozen features (more probes arrive with the evaluation issue)."""

from vitreg.eval.knn import extract_features, knn_accuracy

__all__ = ["extract_features", "knn_accuracy"]

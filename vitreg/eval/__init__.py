"""Evaluation of frozen backbones, register-aware throughout (patches are always tokens ``1 + R:``).

- ``knn``: DINOv2's weighted kNN on the final-norm CLS (bank sharded across processes).
- ``linear``: DINOv2's linear protocol (a grid of classifiers trained together, the best reported).
- ``lost`` + ``boxes``: LOST object discovery and CorLoc on VOC / JSON / CSV box datasets.
- ``token_probes`` + ``ridge``: the registers paper's local (position, pixels) and global (single-token)
  probes of normal vs outlier tokens.
- ``occlusion``: PatchDrop robustness and attention faithfulness (Naseer et al.).
- ``data``, ``features``, ``distributed``: labelled images, feature extraction, process groups.
- ``tasks``: what ``train/analyze.py task=...`` runs; docs/evaluation.md describes every task.
"""

from vitreg.eval.boxes import box_iou, corloc, load_box_dataset
from vitreg.eval.data import LabelledImages, eval_loader, eval_transform, train_transform
from vitreg.eval.features import Features, extract_features, linear_input
from vitreg.eval.knn import evaluate_knn, knn_accuracy, knn_classify
from vitreg.eval.linear import LinearClassifierGrid, LinearSettings, evaluate_linear, probe_features
from vitreg.eval.lost import discover, evaluate_lost, sweep_lost
from vitreg.eval.occlusion import attention_faithfulness, feature_correlation, patch_drop
from vitreg.eval.token_probes import collect_tokens, global_probe, local_probes

__all__ = [
    "Features",
    "LabelledImages",
    "LinearClassifierGrid",
    "LinearSettings",
    "attention_faithfulness",
    "box_iou",
    "collect_tokens",
    "corloc",
    "discover",
    "eval_loader",
    "eval_transform",
    "evaluate_knn",
    "evaluate_linear",
    "evaluate_lost",
    "extract_features",
    "feature_correlation",
    "global_probe",
    "knn_accuracy",
    "knn_classify",
    "linear_input",
    "load_box_dataset",
    "local_probes",
    "patch_drop",
    "probe_features",
    "sweep_lost",
    "train_transform",
]

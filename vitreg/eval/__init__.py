"""Evaluation of frozen backbones, register-aware throughout (patches are always tokens ``1 + R:``).

- ``knn``: DINOv2's weighted kNN on the final-norm CLS (bank sharded across processes).
- ``linear``: DINOv2's linear protocol (a grid of classifiers trained together, the best reported).
- ``lost`` + ``boxes``: LOST object discovery and CorLoc on VOC / JSON / CSV box datasets.
- ``token_probes`` + ``ridge``: the registers paper's local (position, pixels) and global (single-token)
  probes of normal vs outlier tokens.
- ``occlusion``: PatchDrop robustness and attention faithfulness (Naseer et al.).
- ``data``, ``features``, ``distributed``: labelled images (their transforms: ``vitreg.data.transforms``),
  feature extraction, the ranks' rows put back in source order.
- ``tasks``: what ``train/analyze.py task=...`` runs; docs/evaluation.md describes every task.

Import from these modules; the package itself imports none of them, so loading one loads only what it needs.
"""

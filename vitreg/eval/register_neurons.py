"""Register neurons (Jiang et al., "Vision Transformers Don't Need Trained Registers", NeurIPS 2025, Alg. 1).

A few FFN neurons fire on the outlier positions and write the high norms there. Finding them:

1. outlier positions: the patch tokens whose norm at block ``outlier_layer`` (the residual stream after it)
   exceeds a detector's threshold, fitted on all probe images' patch norms at that block (our detectors:
   ``fixed`` is the paper's cutoff, ``valley``/``robust_z`` adapt to the model);
2. for every FFN neuron (the hidden activation after the nonlinearity, SwiGLU's ``silu(x1) * x2`` too) of the
   blocks ``0..highest_layer``: the mean |activation| over an image's outlier positions, averaged over the
   images that have outliers;
3. the ``top_k`` (block, neuron) pairs by that score; optionally only sparse neurons (|activation| < 0.5 on at
   least half of the patch tokens, the paper's filter).

Each neuron also gets ``ratio``: its score over its mean |activation| on the other patch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitreg.eval.token_probes import outlier_threshold
from vitreg.telemetry.detectors import DETECTORS
from vitreg.telemetry.neurons import neuron_activity, resolve_highest_block, top_neurons


@dataclass
class RegisterNeuronSettings:
    """The ``register_neurons`` section of conf/analyze.yaml. Defaults: the paper's DINOv2-L settings."""

    outlier_layer: int = -2  # block whose output norms define the outlier positions
    highest_layer: int | None = None  # last block searched; null: round(depth * 17 / 24) (17 for ViT-L)
    top_k: int = 50
    detector: str = "valley"  # one of DETECTORS; the paper: fixed at 150 for DINOv2-L
    fixed_cutoff: float = 150.0
    sparse_only: bool = False  # the paper's optional filter: |activation| < 0.5 on >= half the tokens
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"register_neurons.detector must be one of {DETECTORS}, got {self.detector!r}")
        if self.top_k < 1:
            raise ValueError(f"register_neurons.top_k must be >= 1, got {self.top_k}")


def highest_block(model: nn.Module, settings: RegisterNeuronSettings) -> int:
    return resolve_highest_block(model, settings.highest_layer, "register_neurons.highest_layer")


@torch.no_grad()
def find_register_neurons(model: nn.Module, images: Tensor, settings: RegisterNeuronSettings | None = None) -> dict:
    """Algorithm 1 on normalised ``images`` (N, 3, H, W) (see the module docstring). Returns the threshold,
    the outlier statistics and ``neurons``: ``[{"layer": block, "neuron": index, "score", "ratio"}, ...]``,
    best first (empty when no image has an outlier). The scoring is ``vitreg.telemetry.neurons``'s."""
    s = settings or RegisterNeuronSettings()
    outlier_block = model.resolve_block(s.outlier_layer, "register_neurons.outlier_layer")
    highest = highest_block(model, s)
    device = next(model.parameters()).device
    patches = model.layout.patches
    was_training = model.training
    model.eval()
    try:
        norms = torch.cat(
            [
                patches(model.forward_intermediates(x.to(device), [outlier_block])[outlier_block].tokens)
                .float()
                .norm(dim=-1)
                .cpu()
                for x in images.split(s.batch_size)
            ]
        )  # (N, P)
        threshold = outlier_threshold(norms, s.detector, cutoff=s.fixed_cutoff)
        outliers = norms > threshold
        chunks = (
            (x.to(device), mask.to(device))
            for x, mask in zip(images.split(s.batch_size), outliers.split(s.batch_size), strict=True)
        )
        activity = neuron_activity(model, chunks, highest)
    finally:
        model.train(was_training)
    result = {
        "outlier_layer": outlier_block,
        "highest_layer": highest,
        "detector": s.detector,
        "threshold": float(threshold),
        "outlier_fraction": float(outliers.float().mean()),
        "images_with_outliers": activity.images_with_outliers,
        "num_images": int(images.shape[0]),
        "neurons": top_neurons(activity, s.top_k, by="score", sparse_only=s.sparse_only),
    }
    if not activity.images_with_outliers:
        result["note"] = f"no patch above the {s.detector} threshold at block {outlier_block}: no register neurons"
    return result

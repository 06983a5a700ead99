"""Self-supervised pieces of the DINOv2 recipe in pure PyTorch: heads, teacher targets, losses, collectives."""

from vitreg.ssl.distributed import all_reduce_mean_, all_reduce_sum_, is_dist, world_size
from vitreg.ssl.heads import DINOHead, WeightNormLinear
from vitreg.ssl.losses import cross_entropy_to_targets, dino_loss, ibot_loss, koleo_loss
from vitreg.ssl.targets import Centering, sinkhorn_knopp

__all__ = [
    "Centering",
    "DINOHead",
    "WeightNormLinear",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "cross_entropy_to_targets",
    "dino_loss",
    "ibot_loss",
    "is_dist",
    "koleo_loss",
    "sinkhorn_knopp",
    "world_size",
]

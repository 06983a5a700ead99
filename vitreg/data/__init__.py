"""Data path for DINOv2 pretraining: an embedded synthetic dataset, multi-crop augmentation, iBOT masking, collation.

Plain torch / NumPy only: nothing here imports Lightning, Hydra or torchvision.
"""

from vitreg.data.collate import MultiCropCollator
from vitreg.data.masking import BlockMaskGenerator
from vitreg.data.synthetic import SHAPES, SyntheticShapes
from vitreg.data.transforms import (
    BLUR_PROBABILITIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropTransform,
    color_jitter,
    gaussian_blur,
    normalize,
    random_resized_crop,
    rgb_to_grayscale,
    solarize,
)

__all__ = [
    "BLUR_PROBABILITIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES",
    "BlockMaskGenerator",
    "MultiCropCollator",
    "MultiCropTransform",
    "SyntheticShapes",
    "color_jitter",
    "gaussian_blur",
    "normalize",
    "random_resized_crop",
    "rgb_to_grayscale",
    "solarize",
]

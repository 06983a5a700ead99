"""vitreg: pretrain Vision Transformers with registers using the DINOv2 recipe."""

__version__ = "0.1.0"

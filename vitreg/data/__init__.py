"""Data path for DINOv2 pretraining: an embedded synthetic dataset, multi-crop augmentation, iBOT masking, collation.

Plain torch / NumPy only: nothing here imports Lightning, Hydra or torchvision.
"""

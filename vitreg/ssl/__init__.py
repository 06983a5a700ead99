"""Self-supervised pieces of the DINOv2 recipe in pure PyTorch: heads, teacher targets, losses, the objective.

Import from the modules themselves (``vitreg.ssl.objective``, ``vitreg.ssl.targets``, ...); the
collectives the losses call live in ``vitreg.utils.distributed``.
"""

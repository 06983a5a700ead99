"""The settings of DINOv2's objective and optimiser: the ``ssl`` and ``optim`` groups of a training run
(conf/ssl/dinov2.yaml, conf/optim/adamw.yaml), whose Hydra schema nodes these classes are.

Defaults are DINOv2's ``ssl_default_config.yaml``. Plain dataclasses: ``vitreg.ssl`` knows nothing of Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CENTERINGS: tuple[str, ...] = ("centering", "sinkhorn_knopp")  # how the teacher's targets are centred
ON_NONFINITE: tuple[str, ...] = ("raise", "skip")  # what a NaN/inf loss does


@dataclass
class HeadConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class DinoConfig(HeadConfig):
    koleo_loss_weight: float = 0.1


@dataclass
class IbotConfig(HeadConfig):
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    # Official DINOv2 masks the student's global crops even when iBOT is off (loss_weight=0), so
    # mask_token keeps learning and DINO/KoLeo see masked inputs; false: no masking without iBOT.
    mask_when_off: bool = True
    # Pad the masked tokens to the batch's upperbound (zero weight, out of the target sums), as DINOv2 pads its
    # head input: static shapes for compile; equal to unpadded up to fp32 summation order.
    pad_masked_tokens: bool = True


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class SSLConfig:
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    centering: str = "centering"  # one of CENTERINGS
    student_temp: float = 0.1
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    on_nonfinite: str = "raise"  # one of ON_NONFINITE
    # with on_nonfinite=skip: stop with an error once more steps than this were skipped
    # (>= 1: a count; in (0, 1): a fraction of the steps tried)
    max_skipped_steps: float = 10


@dataclass
class OptimConfig:
    epochs: int = 100
    official_epoch_length: int = 1250  # DINOv2's "epoch" is this many iterations, whatever the dataset
    base_lr: float = 0.004  # for a global batch of 1024; scaled by scaling_rule
    scaling_rule: str = "sqrt_wrt_1024"  # one of vitreg.ssl.schedules.SCALING_RULES
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per sub-module (backbone, each head); 0 disables
    freeze_last_layer_epochs: int = 1
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    fused: bool | None = None  # fused AdamW kernel; null: on with CUDA (numerically close, not bitwise, to foreach)

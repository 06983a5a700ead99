"""Structured configs for ``train/pretrain.py`` and ``train/analyze.py``: the run-level composition.

Each concept's settings are one dataclass owned by its package (``vitreg.models.config.ModelConfig``,
``vitreg.ssl.config``, ``vitreg.telemetry.stats.TelemetrySettings``, the settings of ``vitreg.eval``'s
tasks); this module composes them with the run-level groups (trainer, logger, callbacks, paths, runtime,
data) into ``pretrain_schema`` and ``analyze_schema`` in Hydra's ConfigStore, so a misspelled key or a
wrong type fails when the config is composed, naming the key. ``validate_config`` then checks the
combinations that cannot work, before any model is built. Defaults are DINOv2's
(``dinov2/configs/ssl_default_config.yaml``); the YAML files in ``conf/`` choose
between them. Code takes a group as its typed dataclass with ``to_dataclass``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

from omegaconf import II, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vitreg.eval.ablate import REPLACEMENTS
from vitreg.eval.ablate import TARGETS as ABLATE_TARGETS
from vitreg.eval.compare import METRICS as COMPARE_METRICS
from vitreg.eval.linear import MODES as LINEAR_MODES
from vitreg.eval.lost import FEATURE_KINDS, NORMALIZATIONS
from vitreg.eval.progress import MODES as PROGRESS_MODES
from vitreg.eval.tasks import AUTOCAST_DTYPES, TASKS, AnalyzeConfig
from vitreg.eval.token_probes import CLASSIFIERS, FEATURES, FIT_ON
from vitreg.models.attention import ATTN_BACKENDS, ATTN_BIASES
from vitreg.models.config import VIT_SIZES, ModelConfig
from vitreg.models.layers import FFN_KINDS
from vitreg.models.test_time_registers import PATCH_VALUES
from vitreg.ssl.config import CENTERINGS, ON_NONFINITE, OptimConfig, SSLConfig
from vitreg.ssl.schedules import SCALING_RULES
from vitreg.telemetry.detectors import DETECTORS
from vitreg.telemetry.stats import STREAMS, TelemetrySettings

T = TypeVar("T")


@dataclass
class AugmentConfig:
    """DINOv2 multi-crop (``crops`` in DINOv2's config)."""

    global_crops_size: int = 224
    local_crops_size: int = 98  # DINOv2 uses 96 with patch 16 and 98 with patch 14
    local_crops_number: int = 8
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    # DINOv2's GaussianBlur inverts its probability: effective 0.0 / 0.9 / 0.5 (global1 / global2 / local).
    # "intended" gives the documented 1.0 / 0.1 / 0.5 instead; or give [global1, global2, local].
    blur_probabilities: Any = "dinov2"
    solarize_prob: float = 0.2
    # how crops leave the loader workers: uint8 (normalised on the GPU, 4x fewer bytes) or normalised float32;
    # auto: uint8 when training on CUDA
    crops_dtype: str = "auto"


@dataclass
class SyntheticDataConfig:
    num_images: int = 4096  # the training set (re-used every pass)
    image_size: int = 112
    num_classes: int = 10
    class_appearance: bool = True  # a class = shape + typical hue and texture; false: shape only (harder)
    as_shards: bool = True  # written once as shards under paths.cache_dir and streamed like real data
    knn_train_images: int = 1000  # held-out labelled pools of the online kNN / linear probes (bank, queries)
    knn_val_images: int = 500


@dataclass
class WebDatasetConfig:
    shards: Any = None  # brace pattern "train-{000000..000127}.tar", a list, or a folder of .tar
    resampled: bool = True  # infinite stream, shards drawn per (rank, worker); false: each shard once
    shuffle_buffer: int = 1000  # samples per loader worker
    min_image_side: int | None = None  # smaller images are skipped and counted; None: the local crop size
    decode_draft: bool = True  # let libjpeg-turbo downscale big JPEGs while decoding (never below the global crop)
    max_skip_fraction: float = 0.05  # abort when more than this fraction of samples is unusable
    min_samples_before_abort: int = 1000  # ... measured over at least this many samples
    max_unusable_in_a_row: int = 1000  # a loader worker stops with an error after this many unusable samples in a row
    missing_shards: str | None = None  # error | warn; null: error on multi-node runs, warn otherwise


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | webdataset
    batch_size_per_device: int = 64
    num_workers: int = 4
    exact_resume: bool = True  # resume continues each data stream where it stopped; false: fresh streams
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    webdataset: WebDatasetConfig = field(default_factory=WebDatasetConfig)


@dataclass
class DDPConfig:
    """``trainer=ddp``: options of Lightning's DDPStrategy (docs/distributed.md)."""

    find_unused_parameters: bool | None = None  # None: only when some student parameter can get no gradient
    static_graph: bool = False
    gradient_as_bucket_view: bool = True  # gradients live in DDP's buckets: one copy less, same numbers
    comm_hook: str = "none"  # none | bf16: gradients all-reduced in bf16 (half the traffic; not bitwise fp32)


@dataclass
class FSDPConfig:
    """``trainer=fsdp``: FSDP2 ``fully_shard`` of student and teacher (docs/distributed.md)."""

    param_dtype: str = "bfloat16"  # float32 | bfloat16: dtype of the all-gathered parameters (the compute)
    reduce_dtype: str = "float32"  # gradient reduce-scatter of the backbones
    head_reduce_dtype: str = "float32"  # ... of the heads (fp32 in DINOv2)
    reshard_after_forward: bool = False  # student; false: SHARD_GRAD_OP (DINOv2), true: FULL_SHARD
    prefetch: int = 0  # blocks all-gathered ahead explicitly in forward and backward; 0: FSDP2's implicit prefetch


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (FSDP2) | any other Lightning strategy name
    precision: str | None = None  # None: bf16-mixed on GPU, 32-true on CPU
    max_steps: int | None = None  # None: optim.epochs × optim.official_epoch_length
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    progress: str = "auto"  # auto: a bar on a terminal, one line every log_every_n_steps otherwise | bar | lines
    compile: bool | None = None  # per-block torch.compile of student and teacher; null: on with CUDA
    # the device's dense bf16 peak in TFLOP/s for perf/mfu; null: known for H100/H200/H800/A100/L40S, else no mfu
    peak_tflops: float | None = None
    deterministic: bool = False
    ddp: DDPConfig = field(default_factory=DDPConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class WandbConfig:
    """``logger=wandb``; see docs/wandb.md. None fields are derived from the run (vitreg/lit/wandb_logger.py)."""

    project: str = "vitreg"
    entity: str | None = None  # None: the API key's default entity
    group: str | None = None  # None: one group per SLURM array or Hydra sweep, else none
    tags: list[str] = field(default_factory=list)  # registers=<n> and model=<arch> are always added
    name: str | None = None  # None: the run dir under paths.output_root, e.g. demo/registers=4
    id: str | None = None  # None: the id kept in <run_dir>/wandb_id.txt (created once)
    notes: str | None = None
    job_type: str | None = None
    mode: str = "auto"  # auto | online | offline | disabled; auto: online only with credentials + a reachable server


@dataclass
class LoggerConfig:
    # Which loggers run: the conf/logger group files each enable theirs, so logger=[csv,wandb] runs both.
    enabled: dict[str, bool] = field(default_factory=dict)  # csv | tensorboard | wandb -> on
    kind: str | None = None  # one logger instead of `enabled` (csv | tensorboard | wandb | none); older overrides
    wandb: WandbConfig = field(default_factory=WandbConfig)


LOGGERS = ("csv", "tensorboard", "wandb")  # the order they are built in
MODELS = ("teacher", "student")  # the backbones a run measures / a checkpoint holds


def active_loggers(logger: Any) -> list[str]:
    """The loggers a run builds, in ``LOGGERS`` order: ``logger.kind`` when set (``none``: no logger), else
    the names ``logger.enabled`` switches on."""
    if logger.kind is not None:
        return [] if logger.kind == "none" else [logger.kind]
    return [name for name in LOGGERS if (logger.enabled or {}).get(name)]


MEDIA_STYLES = ("figures", "tiles")  # how vitreg/lit/telemetry.py draws its pictures


@dataclass
class TelemetryConfig(TelemetrySettings):
    """``callbacks.telemetry``: when and on what the artifact-telemetry callback measures, on top of how it
    measures (``TelemetrySettings``, shared with train/analyze.py); conf/callbacks/default.yaml says each key."""

    enabled: bool = True
    every_n_steps: int = 500
    num_images: int = 64
    resolutions: list[int] = field(default_factory=list)  # empty: the global crop size only
    models: list[str] = field(default_factory=lambda: ["teacher"])
    probe_source: str | None = None  # folder or shards; null: the synthetic val split or the training shards
    media_every_n_measurements: int = 1
    media_style: str = "figures"  # figures (labelled, ~1 s per measurement) | tiles (numpy, ms; high cadences)
    alerts: bool = True  # W&B alert + log warning when artifacts first emerge / the outlier fraction crosses
    alert_outlier_fraction: float | None = 0.01  # last-layer patch outlier fraction that alerts; null: never


@dataclass
class OnlineKNNConfig:
    """DINOv2's weighted kNN on the teacher's CLS during pretraining (vitreg/lit/probes.py::OnlineKNN)."""

    enabled: bool = False
    every_n_steps: int = 0  # 0: only before (step 0) and after training
    ks: list[int] = field(default_factory=lambda: [10, 20])
    temperature: float = 0.07
    bank_size: int = 10000  # at most this many train-split images in the bank: bounds memory and time
    num_queries: int = 5000  # at most this many val-split query images
    train_source: str | None = None  # class folders, list file or labelled shards; null: synthetic held-out images
    val_source: str | None = None
    batch_size: int = 128  # images per process per forward
    num_workers: int = 2


@dataclass
class OnlineLinearConfig:
    """A linear classifier on the detached teacher CLS of every training batch (OnlineLinearProbe)."""

    enabled: bool = False
    every_n_steps: int = 0  # val/linear_top1 every n steps (0: only after training)
    num_classes: int | None = None  # null: data.synthetic.num_classes (required with data=webdataset)
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_source: str | None = None  # null: the synthetic val split, or no val measurement with data=webdataset
    num_queries: int = 5000
    batch_size: int = 128
    num_workers: int = 2


@dataclass
class CallbacksConfig:
    checkpoint_every_n_steps: int = 1250
    keep_last_k: int = 3  # step checkpoints kept besides last.ckpt (the fallback when last.ckpt is damaged)
    online_knn: OnlineKNNConfig = field(default_factory=OnlineKNNConfig)
    online_linear: OnlineLinearConfig = field(default_factory=OnlineLinearConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


@dataclass
class PathsConfig:
    output_root: str = "outputs"
    cache_dir: str = "${paths.output_root}/.cache"  # generated data (the synthetic shards), reused by later runs
    run_dir: str = "${paths.output_root}/${run_name}"


@dataclass
class RuntimeConfig:
    """Preemption handling (vitreg/runtime/signals.py, slurm/README.md)."""

    requeue: bool = True  # under SLURM, `scontrol requeue` the job after the preemption checkpoint
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])  # empty: no preemption handling
    save_on_interrupt: bool = True  # Ctrl-C saves last.ckpt after the current batch and stops; twice: stop at once


@dataclass
class PretrainConfig:
    # student and teacher have the top-level `registers` (the sweep axis) as their register count
    model: ModelConfig = field(default_factory=lambda: ModelConfig(num_register_tokens=II("registers")))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    registers: int = 0
    run_name: str = "default"  # names the run directory: deterministic, never a timestamp
    seed: int = 0
    ckpt_path: str | None = None  # resume from this Lightning checkpoint
    resume: str = "auto"  # auto: continue from the run dir's newest good checkpoint; never: start fresh
    # keys (dotted, e.g. data.webdataset.shards) a resume may change although they change the run's meaning
    resume_allow_changes: list[str] = field(default_factory=list)
    run_id: str | None = None  # run dir <output_root>/<run_name>/<run_id> (vitreg/runtime/run_dir.py)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def register_configs() -> None:
    """Register the schemas with Hydra (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)
    ConfigStore.instance().store(name="analyze_schema", node=AnalyzeConfig)


def to_dataclass(cls: type[T], node: Any) -> T:
    """A config group as its typed dataclass: a composed node (interpolations resolved) or a plain mapping,
    e.g. a checkpoint's ``hyper_parameters["cfg"]`` (keys it lacks take the defaults; unknown keys fail)."""
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))


# ---------------------------------------------------------------------------------------------
CHOICES = {
    "ssl.centering": CENTERINGS,
    "ssl.on_nonfinite": ON_NONFINITE,
    "optim.scaling_rule": SCALING_RULES,
    "logger.kind": (None, *LOGGERS, "none"),
    "logger.wandb.mode": ("auto", "online", "offline", "disabled"),
    "model.attn_backend": ATTN_BACKENDS,
    "model.attn_bias": ATTN_BIASES,
    "data.name": ("synthetic", "webdataset"),
    "data.webdataset.missing_shards": (None, "error", "warn"),
    "resume": ("auto", "never"),
    "trainer.progress": ("auto", "bar", "lines"),
    "augment.crops_dtype": ("auto", "uint8", "float32"),
    "trainer.ddp.comm_hook": ("none", "bf16"),
    "callbacks.telemetry.stream": STREAMS,
    "callbacks.telemetry.detector": DETECTORS,
    "callbacks.telemetry.media_style": MEDIA_STYLES,
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
}

# (key, test, requirement): each value must pass its test, else "<key>: must be <requirement>, got <value>".
# NaN fails every test. Checked first, so later checks can divide by model.patch_size.
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("model.patch_size", lambda v: v >= 1, ">= 1 (14 for ViT-x/14, 16 for ViT-x/16)"),
    ("model.drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1) (DINOv2: 0.3-0.4; 1 drops every block)"),
    ("model.register_init_std", lambda v: v >= 0, ">= 0 (DINOv2: 1e-6)"),
    ("augment.solarize_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1] (DINOv2: 0.2)"),
    ("ssl.student_temp", lambda v: v > 0, "> 0 (DINOv2: 0.1)"),
    ("ssl.teacher.teacher_temp", lambda v: v > 0, "> 0 (DINOv2: 0.07)"),
    ("ssl.teacher.warmup_teacher_temp", lambda v: v > 0, "> 0 (DINOv2: 0.04)"),
    ("ssl.teacher.warmup_teacher_temp_epochs", lambda v: v >= 0, ">= 0 (DINOv2: 30)"),
    ("ssl.center_momentum", lambda v: 0 <= v <= 1, "in [0, 1] (DINOv2: 0.9)"),
    ("ssl.sinkhorn_iterations", lambda v: v >= 1, ">= 1 (DINOv2: 3)"),
    ("ssl.dino.loss_weight", lambda v: v >= 0, ">= 0 (0 turns the DINO loss off; a negative weight maximises it)"),
    ("ssl.ibot.loss_weight", lambda v: v >= 0, ">= 0 (0 turns iBOT off; a negative weight maximises it)"),
    ("ssl.dino.koleo_loss_weight", lambda v: v >= 0, ">= 0 (0 turns KoLeo off; DINOv2: 0.1)"),
    ("optim.base_lr", lambda v: v > 0, "> 0 (DINOv2: 0.004 for a global batch of 1024)"),
    ("optim.min_lr", lambda v: v >= 0, ">= 0 (DINOv2: 1e-6)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0 (DINOv2: 0.04)"),
    ("optim.weight_decay_end", lambda v: v >= 0, ">= 0 (DINOv2: 0.4)"),
    ("optim.layerwise_decay", lambda v: 0 < v <= 1, "in (0, 1] (DINOv2: 0.9; 1.0 for ViT-L/g)"),
    ("optim.clip_grad", lambda v: v >= 0, ">= 0 (0 turns clipping off; DINOv2: 3.0)"),
    ("optim.patch_embed_lr_mult", lambda v: v >= 0, ">= 0 (DINOv2: 0.2)"),
    ("optim.adamw_beta1", lambda v: 0 <= v < 1, "in [0, 1) (DINOv2: 0.9)"),
    ("optim.adamw_beta2", lambda v: 0 <= v < 1, "in [0, 1) (DINOv2: 0.999)"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0 (DINOv2: 10)"),
    ("optim.freeze_last_layer_epochs", lambda v: v >= 0, ">= 0 (DINOv2: 1)"),
    ("data.num_workers", lambda v: v >= 0, ">= 0 (0 loads in the training process)"),
    ("data.webdataset.shuffle_buffer", lambda v: v >= 1, ">= 1 samples per loader worker (1: no shuffling)"),
    ("data.webdataset.min_image_side", lambda v: v is None or v >= 1, "null (the local crop size) or >= 1"),
    ("trainer.log_every_n_steps", lambda v: v >= 1, ">= 1 (with 0 no metric is ever logged)"),
    ("trainer.fsdp.prefetch", lambda v: v >= 0, ">= 0 blocks (0: FSDP2's implicit prefetch)"),
    ("trainer.peak_tflops", lambda v: v is None or v > 0, "null (known GPUs) or > 0, e.g. 989 for an H100 SXM"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1] (Lightning refuses other seeds)"),
)


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and the fix."""


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


def validate_config(cfg: DictConfig | PretrainConfig) -> None:
    """Reject configurations that cannot work, before anything is built."""
    c = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(c, key)
        if value not in allowed:
            _fail(key, f"must be one of {list(allowed)}, got {value!r}")
    _validate_ranges(c)
    if c.registers < 0 or c.model.num_register_tokens < 0:
        _fail("registers", f"must be >= 0 (0 = no registers), got {c.model.num_register_tokens}")
    if c.model.arch not in VIT_SIZES:
        _fail("model.arch", f"unknown size {c.model.arch!r}; choose one of {list(VIT_SIZES)} (e.g. model=vitl)")
    if c.model.ffn_layer is not None and c.model.ffn_layer not in FFN_KINDS:
        _fail("model.ffn_layer", f"must be mlp, swiglu or null, got {c.model.ffn_layer!r}")
    p = c.model.patch_size
    for key in ("global_crops_size", "local_crops_size"):
        size = c.augment[key]
        if size <= 0 or size % p:
            near = max(p, round(size / p) * p)
            _fail(f"augment.{key}", f"{size} is not a multiple of model.patch_size {p}; use e.g. {near}")
    blur = c.augment.blur_probabilities
    if isinstance(blur, str):
        if blur not in ("dinov2", "intended"):
            _fail("augment.blur_probabilities", f"use dinov2, intended or [global1, global2, local]; got {blur!r}")
    elif not _is_probabilities(blur, 3):
        _fail("augment.blur_probabilities", f"must be 3 probabilities [global1, global2, local], got {blur!r}")
    if c.augment.local_crops_number < 0:
        _fail("augment.local_crops_number", f"must be >= 0, got {c.augment.local_crops_number}")
    for key in ("global_crops_scale", "local_crops_scale"):
        lo, hi = _min_max(f"augment.{key}", c.augment[key])
        if not 0 < lo <= hi <= 1:
            _fail(f"augment.{key}", f"must be [min, max] with 0 < min <= max <= 1, got {[lo, hi]}")
    lo, hi = _min_max("ssl.ibot.mask_ratio_min_max", c.ssl.ibot.mask_ratio_min_max)
    if not 0 <= lo <= hi <= 1:
        _fail("ssl.ibot.mask_ratio_min_max", f"must be [min, max] within [0, 1], got {[lo, hi]}")
    if not 0 <= c.ssl.ibot.mask_sample_probability <= 1:
        _fail("ssl.ibot.mask_sample_probability", f"must be in [0, 1], got {c.ssl.ibot.mask_sample_probability}")
    if c.data.name == "webdataset" and not c.data.webdataset.shards:
        _fail(
            "data.webdataset.shards",
            "no shards given: set it to a brace pattern, a list or a folder of .tar files "
            "(make them with scripts/make_shards.py)",
        )
    if not 0 <= c.data.webdataset.max_skip_fraction <= 1:
        _fail("data.webdataset.max_skip_fraction", f"must be in [0, 1], got {c.data.webdataset.max_skip_fraction}")
    if c.data.webdataset.max_unusable_in_a_row < 1:
        _fail(
            "data.webdataset.max_unusable_in_a_row",
            f"must be >= 1 (unusable samples in a row before a loader worker stops), "
            f"got {c.data.webdataset.max_unusable_in_a_row}",
        )
    if c.data.batch_size_per_device < 1:
        _fail("data.batch_size_per_device", f"must be >= 1, got {c.data.batch_size_per_device}")
    if c.ssl.dino.koleo_loss_weight > 0 and c.data.batch_size_per_device < 2:
        _fail(
            "ssl.dino.koleo_loss_weight",
            "KoLeo needs at least 2 images per device (it uses each image's nearest neighbour); "
            "raise data.batch_size_per_device or set ssl.dino.koleo_loss_weight=0",
        )
    if c.ssl.dino.loss_weight <= 0 and c.ssl.ibot.loss_weight <= 0:
        _fail("ssl.dino.loss_weight", "DINO and iBOT are both disabled: nothing to train")
    for key in ("dino", "ibot"):
        head = c.ssl[key]
        for sub in ("head_n_prototypes", "head_bottleneck_dim", "head_hidden_dim", "head_nlayers"):
            if head[sub] < 1:
                _fail(f"ssl.{key}.{sub}", f"must be >= 1, got {head[sub]}")
    if not 0 < c.ssl.teacher.momentum_teacher <= c.ssl.teacher.final_momentum_teacher <= 1:
        _fail("ssl.teacher.momentum_teacher", "need 0 < momentum_teacher <= final_momentum_teacher <= 1")
    if c.optim.epochs < 1 or c.optim.official_epoch_length < 1:
        _fail("optim.epochs", "optim.epochs and optim.official_epoch_length must be >= 1")
    if c.optim.warmup_epochs > c.optim.epochs:
        _fail("optim.warmup_epochs", f"{c.optim.warmup_epochs} exceeds optim.epochs {c.optim.epochs}")
    if c.trainer.max_steps is not None and c.trainer.max_steps < 1:
        _fail("trainer.max_steps", f"must be >= 1 or null, got {c.trainer.max_steps}")
    if c.logger.wandb.id and any(ch in str(c.logger.wandb.id) for ch in "/\\#?%: "):
        _fail("logger.wandb.id", f"W&B run ids cannot contain / \\ # ? % : or spaces, got {c.logger.wandb.id!r}")
    if c.trainer.precision not in (None, "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"):
        _fail("trainer.precision", f"use null (auto), 32-true, bf16-mixed or 16-mixed; got {c.trainer.precision!r}")
    _validate_lr_and_schedules(c)
    _validate_skipped_steps(c)
    _validate_synthetic_data(c)
    _validate_run_on_cpu(c)
    _validate_files(c)
    _validate_resume_allow_changes(c)
    validate_run_name(c.run_name)
    _validate_telemetry(c)
    _validate_online_probes(c)
    _validate_checkpoints(c)
    _validate_runtime(c)
    _validate_trainer(c)
    _validate_loggers(c)


def _validate_loggers(c: DictConfig) -> None:
    import importlib.util

    for name in c.logger.enabled or {}:
        if name not in LOGGERS:
            _fail(f"logger.enabled.{name}", f"unknown logger; use {'/'.join(LOGGERS)}, e.g. logger=[csv,wandb]")
    if "tensorboard" in active_loggers(c.logger) and not any(
        importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
    ):
        _fail("logger", "logger=tensorboard needs the tensorboard package: pip install 'vitreg[tensorboard]'")


def _validate_ranges(c: DictConfig) -> None:
    for key, test, requirement in RANGES:
        value = OmegaConf.select(c, key)
        if not test(value):
            _fail(key, f"must be {requirement}, got {value!r}")


def _is_probabilities(values: Any, count: int) -> bool:
    return (
        OmegaConf.is_list(values)
        and len(values) == count
        and all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in values)
    )


def _min_max(key: str, pair: Any) -> tuple[float, float]:
    if not OmegaConf.is_list(pair) or len(pair) != 2:
        _fail(key, f"must be a pair [min, max], got {pair!r}")
    return pair[0], pair[1]


def _validate_lr_and_schedules(c: DictConfig) -> None:
    from vitreg.ssl.schedules import scaled_lr

    o, batch = c.optim, c.data.batch_size_per_device
    # The world size is unknown here: the peak of one device is the lowest the run can have.
    peak = scaled_lr(o.base_lr, batch, o.scaling_rule)
    if o.min_lr > peak:
        _fail(
            "optim.min_lr",
            f"{o.min_lr} is above the peak lr {peak:.3g} (optim.base_lr {o.base_lr} scaled by {o.scaling_rule} "
            f"for one device's batch of {batch}; more devices raise it): the cosine would raise the lr after "
            "the warmup instead of lowering it; lower optim.min_lr (DINOv2: 1e-6) or raise optim.base_lr",
        )
    if o.freeze_last_layer_epochs > o.epochs:
        _fail(
            "optim.freeze_last_layer_epochs",
            f"{o.freeze_last_layer_epochs} exceeds optim.epochs {o.epochs}: the heads' last layer would never train",
        )


def _validate_skipped_steps(c: DictConfig) -> None:
    limit = c.ssl.max_skipped_steps
    is_fraction = 0 < limit < 1
    is_count = math.isfinite(limit) and limit >= 1 and limit == int(limit)
    if not (is_fraction or is_count):
        _fail(
            "ssl.max_skipped_steps",
            f"must be a whole number of steps >= 1 or a fraction in (0, 1) of the steps tried, got {limit}",
        )


def _validate_synthetic_data(c: DictConfig) -> None:
    if c.data.name != "synthetic":
        return
    from vitreg.data.synthetic import SHAPES

    s = c.data.synthetic
    if not 1 <= s.num_classes <= len(SHAPES):
        _fail("data.synthetic.num_classes", f"must be in [1, {len(SHAPES)}] (one shape per class), got {s.num_classes}")
    if s.image_size < 16:
        _fail("data.synthetic.image_size", f"must be >= 16 px to draw recognisable shapes, got {s.image_size}")
    if s.num_images < 1:
        _fail("data.synthetic.num_images", f"must be >= 1, got {s.num_images}")


GPU_ONLY_PRECISIONS = ("16-mixed",)


def _validate_run_on_cpu(c: DictConfig) -> None:
    t = c.trainer
    if t.precision not in GPU_ONLY_PRECISIONS:
        return
    import torch

    if t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available()):
        where = "trainer.accelerator=cpu" if t.accelerator == "cpu" else "accelerator auto, no GPU visible"
        _fail(
            "trainer.precision",
            f"{t.precision} needs a CUDA GPU and this run is on the CPU ({where}): Lightning would silently train "
            f"in bf16-mixed while config.yaml says {t.precision}; use trainer.precision=32-true or bf16-mixed",
        )


def _validate_files(c: DictConfig) -> None:
    weights = c.model.pretrained_weights
    if weights and not os.path.isfile(weights):
        _fail(
            "model.pretrained_weights",
            f"no file at {weights}; give an official DINOv2 backbone file (e.g. dinov2_vitl14_reg4_pretrain.pth) "
            "or null to start from random weights",
        )
    if c.ckpt_path and not os.path.exists(c.ckpt_path):
        _fail(
            "ckpt_path",
            f"no checkpoint at {c.ckpt_path}; give an existing checkpoint, or ckpt_path=null "
            "(resume=auto continues from the run directory's newest checkpoint)",
        )


_ABSENT = object()


def _validate_resume_allow_changes(c: DictConfig) -> None:
    for entry in c.resume_allow_changes:
        key = str(entry).strip()
        try:
            found = OmegaConf.select(c, key, default=_ABSENT, throw_on_resolution_failure=False) if key else _ABSENT
        except OmegaConfBaseException:  # not even a well-formed key
            found = _ABSENT
        if found is _ABSENT:
            _fail(
                "resume_allow_changes",
                f"{entry!r} is not a key of this config; list dotted keys such as data.webdataset.shards",
            )


def validate_run_name(run_name: str) -> None:
    """Refuse a ``run_name`` whose run directory would not lie inside ``paths.output_root``.

    Public so that the run-directory resolver can refuse it before Hydra creates the directory."""
    name = str(run_name)
    parts = PurePosixPath(name).parts
    if not name.strip() or not parts or os.path.isabs(name) or ".." in parts:
        _fail(
            "run_name",
            "must be a relative directory name inside paths.output_root (e.g. vitl-reg4 or sweeps/vitl-reg4): "
            f"not empty or '.', no leading /, no '..'; got {run_name!r}",
        )


def _validate_runtime(c: DictConfig) -> None:
    import signal

    run_id = OmegaConf.select(c, "run_id", default=None)
    if run_id is not None and (not str(run_id) or "/" in str(run_id) or str(run_id) in (".", "..")):
        _fail("run_id", f"must be a single directory name (no /), got {run_id!r}")
    for name in OmegaConf.select(c, "runtime.signals", default=None) or []:
        key = str(name).upper()
        if (key if key.startswith("SIG") else f"SIG{key}") not in signal.Signals.__members__:
            _fail("runtime.signals", f"unknown signal {name!r}; use e.g. [SIGUSR1, SIGTERM] or [] to disable")


def _validate_checkpoints(c: DictConfig) -> None:
    if c.callbacks.checkpoint_every_n_steps < 1:
        _fail("callbacks.checkpoint_every_n_steps", f"must be >= 1, got {c.callbacks.checkpoint_every_n_steps}")
    if c.callbacks.keep_last_k < 1:
        _fail(
            "callbacks.keep_last_k",
            f"must be >= 1 (the fallback when last.ckpt is damaged), got {c.callbacks.keep_last_k}",
        )


def _validate_online_probes(c: DictConfig) -> None:
    knn, linear = c.callbacks.online_knn, c.callbacks.online_linear
    synthetic = c.data.name == "synthetic"
    if knn.enabled:
        ks = list(knn.ks)
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks):
            _fail("callbacks.online_knn.ks", f"must be a non-empty list of positive integers, got {ks}")
        if not knn.temperature > 0:
            _fail("callbacks.online_knn.temperature", f"must be > 0, got {knn.temperature}")
        if knn.bank_size < max(ks):
            _fail("callbacks.online_knn.bank_size", f"{knn.bank_size} is smaller than the largest k {max(ks)}")
        if not synthetic and not (knn.train_source and knn.val_source):
            _fail(
                "callbacks.online_knn.train_source",
                "the online kNN needs labelled probe images with data=webdataset: set callbacks.online_knn."
                "train_source and callbacks.online_knn.val_source (class folders, a list file or labelled shards), "
                "or callbacks.online_knn.enabled=false",
            )
        if knn.every_n_steps < 0:
            _fail("callbacks.online_knn.every_n_steps", f"must be >= 0, got {knn.every_n_steps}")
        for key in ("num_queries", "batch_size"):
            if knn[key] < 1:
                _fail(f"callbacks.online_knn.{key}", f"must be >= 1, got {knn[key]}")
        if knn.num_workers < 0:
            _fail("callbacks.online_knn.num_workers", f"must be >= 0, got {knn.num_workers}")
    if linear.enabled:
        if linear.every_n_steps < 0:
            _fail("callbacks.online_linear.every_n_steps", f"must be >= 0, got {linear.every_n_steps}")
        if not linear.lr > 0:
            _fail("callbacks.online_linear.lr", f"must be > 0, got {linear.lr}")
        if not 0 <= linear.momentum < 1:
            _fail("callbacks.online_linear.momentum", f"must be in [0, 1), got {linear.momentum}")
        if linear.weight_decay < 0:
            _fail("callbacks.online_linear.weight_decay", f"must be >= 0, got {linear.weight_decay}")
        if linear.num_classes is None and not synthetic:
            _fail(
                "callbacks.online_linear.num_classes",
                "required with data=webdataset: set it to the number of classes of the training shards' cls labels",
            )
        if linear.num_classes is not None and linear.num_classes < 2:
            _fail("callbacks.online_linear.num_classes", f"must be >= 2, got {linear.num_classes}")
        for key in ("num_queries", "batch_size"):
            if linear[key] < 1:
                _fail(f"callbacks.online_linear.{key}", f"must be >= 1, got {linear[key]}")
        if linear.num_workers < 0:
            _fail("callbacks.online_linear.num_workers", f"must be >= 0, got {linear.num_workers}")


def _validate_telemetry(c: DictConfig) -> None:
    t = c.callbacks.telemetry
    if not t.enabled:
        return
    for key in ("every_n_steps", "num_images", "media_every_n_measurements", "chunk_size"):
        if t[key] < 1:
            _fail(f"callbacks.telemetry.{key}", f"must be >= 1, got {t[key]}")
    unknown = [m for m in t.models if m not in MODELS]
    if unknown or not t.models:
        _fail("callbacks.telemetry.models", f"use a non-empty subset of [teacher, student], got {list(t.models)}")
    p = c.model.patch_size
    for res in t.resolutions:
        if res < p or res % p:
            _fail("callbacks.telemetry.resolutions", f"{res} is not a positive multiple of model.patch_size {p}")
    if not 0 <= t.emergence_fraction < 1:
        _fail("callbacks.telemetry.emergence_fraction", f"must be in [0, 1), got {t.emergence_fraction}")
    if t.robust_z <= 0 or t.fixed_cutoff <= 0:
        _fail("callbacks.telemetry.robust_z", "robust_z and fixed_cutoff must be > 0")
    if t.alert_outlier_fraction is not None and not 0 < t.alert_outlier_fraction <= 1:
        _fail(
            "callbacks.telemetry.alert_outlier_fraction",
            f"must be in (0, 1] or null (no outlier-fraction alert), got {t.alert_outlier_fraction}",
        )
    if t.neuron_top_k < 1:
        _fail("callbacks.telemetry.neuron_top_k", f"must be >= 1, got {t.neuron_top_k}")
    if t.neuron_num_images is not None and t.neuron_num_images < 1:
        _fail("callbacks.telemetry.neuron_num_images", f"must be >= 1 or null (every image), got {t.neuron_num_images}")
    depth = c.model.get("depth") or VIT_SIZES.get(c.model.arch, {}).get("depth")
    for key in ("neuron_outlier_layer", "neuron_highest_layer"):
        block = t[key]
        if depth is not None and block is not None and not -depth <= block < depth:
            _fail(
                f"callbacks.telemetry.{key}", f"{block} is out of range for a {depth}-block model; use 0..{depth - 1}"
            )


def _validate_trainer(c: DictConfig) -> None:
    t = c.trainer
    if not isinstance(t.num_nodes, int) or t.num_nodes < 1:
        _fail("trainer.num_nodes", f"must be an integer >= 1, got {t.num_nodes!r}")
    d = t.devices
    if isinstance(d, int) and not isinstance(d, bool) and d < 1 and d != -1:
        _fail("trainer.devices", f"must be >= 1, -1 (every device), auto or a list of device ids, got {d}")
    if t.strategy in ("ddp", "fsdp") and c.ssl.on_nonfinite == "skip":
        _fail(
            "ssl.on_nonfinite",
            f"skip is not possible with trainer={t.strategy}: Lightning refuses to skip a training step "
            "(training_step returning None) in distributed training; use ssl.on_nonfinite=raise",
        )
    if t.strategy != "fsdp":
        return
    for key in ("param_dtype", "reduce_dtype", "head_reduce_dtype"):
        value = t.fsdp[key]
        if value not in ("float32", "bfloat16"):
            hint = "; float16 would need a gradient scaler, which this FSDP2 path has not" if value == "float16" else ""
            _fail(f"trainer.fsdp.{key}", f"must be float32 or bfloat16, got {value!r}{hint}")
    if t.precision not in ("32-true", "32"):
        _fail(
            "trainer.precision",
            "trainer=fsdp casts parameters itself (trainer.fsdp.param_dtype), so Lightning's precision "
            f"must be 32-true, got {t.precision!r}",
        )


def validate_analyze_config(c: DictConfig) -> None:
    """Reject analysis configs that cannot work, naming the key and the fix."""
    if c.task not in TASKS:
        _fail("task", f"must be one of {', '.join(TASKS)}, got {c.task!r}")
    if c.model not in MODELS:
        _fail("model", f"must be teacher or student, got {c.model!r}")
    if c.num_images < 1:
        _fail("num_images", f"must be >= 1, got {c.num_images}")
    if not os.path.exists(c.checkpoint):
        _fail("checkpoint", f"no file at {c.checkpoint}")
    if c.images is not None and not os.path.exists(c.images) and "{" not in str(c.images):
        _fail("images", f"no folder, image or shard at {c.images}")
    t = c.telemetry
    if t.stream not in STREAMS:
        _fail("telemetry.stream", f"must be prenorm or postnorm, got {t.stream!r}")
    if t.detector not in DETECTORS:
        _fail("telemetry.detector", f"must be fixed, robust_z or valley, got {t.detector!r}")
    if c.autocast is not None and c.autocast not in AUTOCAST_DTYPES:
        _fail("autocast", f"must be null, float32, bfloat16 or float16, got {c.autocast!r}")
    if c.progress not in PROGRESS_MODES:
        _fail("progress", f"must be auto, bar, lines or off, got {c.progress!r}")
    _validate_eval_sections(c)


def _validate_source(key: str, source: str) -> None:
    if source != "synthetic" and not os.path.exists(source) and "{" not in source:
        _fail(key, f"no class-folder tree, list file or shards at {source}; or use synthetic")


def _validate_ablate(c: DictConfig) -> None:
    a = c.ablate
    for key, allowed in (("targets", ABLATE_TARGETS), ("replacements", REPLACEMENTS), ("metrics", COMPARE_METRICS)):
        chosen = list(a[key])
        if not chosen or any(v not in allowed for v in chosen):
            _fail(f"ablate.{key}", f"must list some of {', '.join(allowed)}, got {chosen}")
    if a.detector not in DETECTORS:
        _fail("ablate.detector", f"must be one of {', '.join(DETECTORS)}, got {a.detector!r}")
    for key in ("reference_images", "batch_size"):
        if a[key] < 1:
            _fail(f"ablate.{key}", f"must be >= 1, got {a[key]}")
    if a.layers is not None and not list(a.layers):
        _fail("ablate.layers", "must be null (every block) or a non-empty list of block indices, e.g. [-1]")
    if c.task != "ablate":
        return
    _validate_source("data.train", c.data.train)  # the reference set, and kNN's bank
    if {"knn", "linear"} & set(a.metrics):
        _validate_source("data.val", c.data.val)
    if "lost" in a.metrics and c.lost.dataset is not None and not os.path.exists(c.lost.dataset):
        _fail("lost.dataset", f"no VOC folder, .json or .csv at {c.lost.dataset}; or null for generated images")


def _validate_eval_sections(c: DictConfig) -> None:
    d = c.data
    if c.task in ("knn", "linear", "global"):
        _validate_source("data.train", d.train)
        _validate_source("data.val", d.val)
    for key in ("batch_size", "synthetic_images", "synthetic_image_size", "synthetic_classes"):
        if d[key] < 1:
            _fail(f"data.{key}", f"must be >= 1, got {d[key]}")
    if not 2 <= d.synthetic_classes <= 12:
        _fail(
            "data.synthetic_classes",
            f"synthetic images have 2 to 12 classes (one shape each), got {d.synthetic_classes}",
        )
    if d.num_workers < 0:
        _fail("data.num_workers", f"must be >= 0, got {d.num_workers}")
    for key in ("limit_train", "limit_val"):
        if d[key] is not None and d[key] < 1:
            _fail(f"data.{key}", f"must be null or >= 1, got {d[key]}")
    if d.resolution is not None and d.resolution < 1:
        _fail("data.resolution", f"must be null or a positive multiple of the patch size, got {d.resolution}")
    if not c.knn.ks or any(k < 1 for k in c.knn.ks):
        _fail("knn.ks", f"must be a non-empty list of positive integers, got {list(c.knn.ks)}")
    if c.knn.temperature <= 0:
        _fail("knn.temperature", f"must be > 0, got {c.knn.temperature}")
    lin = c.linear
    if lin.mode not in LINEAR_MODES:
        _fail("linear.mode", f"must be augmented (DINOv2's protocol) or cached, got {lin.mode!r}")
    if not lin.n_last_blocks or any(n < 1 for n in lin.n_last_blocks):
        _fail("linear.n_last_blocks", f"must be a non-empty list of positive integers, got {list(lin.n_last_blocks)}")
    if not lin.learning_rates or any(lr <= 0 for lr in lin.learning_rates):
        _fail("linear.learning_rates", f"must be a non-empty list of positive numbers, got {list(lin.learning_rates)}")
    for key in ("epochs", "iterations_per_epoch", "batch_size"):
        if lin[key] < 1:
            _fail(f"linear.{key}", f"must be >= 1, got {lin[key]}")
    lost = c.lost
    kinds, norms = FEATURE_KINDS, NORMALIZATIONS
    if lost.kind not in kinds or any(k not in kinds for k in lost.sweep_kinds):
        _fail("lost.kind", f"feature kinds must be among {kinds}, got {lost.kind!r} / {list(lost.sweep_kinds)}")
    if lost.normalize not in norms or any(n not in norms for n in lost.sweep_normalize):
        _fail("lost.normalize", f"must be among {norms}, got {lost.normalize!r} / {list(lost.sweep_normalize)}")
    if lost.k_patches < 1:
        _fail("lost.k_patches", f"must be >= 1, got {lost.k_patches}")
    if c.task == "lost" and lost.dataset is not None and not os.path.exists(lost.dataset):
        _fail("lost.dataset", f"no VOC folder, .json or .csv at {lost.dataset}; or null for generated images")
    rn = c.register_neurons
    if rn.detector not in DETECTORS:
        _fail("register_neurons.detector", f"must be one of {', '.join(DETECTORS)}, got {rn.detector!r}")
    if rn.top_k < 1:
        _fail("register_neurons.top_k", f"must be >= 1, got {rn.top_k}")
    if rn.batch_size < 1:
        _fail("register_neurons.batch_size", f"must be >= 1, got {rn.batch_size}")
    ttr = c.ttr
    if ttr.num_tokens < 1:
        _fail("ttr.num_tokens", f"must be >= 1, got {ttr.num_tokens}")
    if ttr.patch_values not in PATCH_VALUES:
        _fail("ttr.patch_values", f"must be one of {', '.join(PATCH_VALUES)}, got {ttr.patch_values!r}")
    if not ttr.metrics or any(m not in COMPARE_METRICS for m in ttr.metrics):
        _fail("ttr.metrics", f"must list some of {', '.join(COMPARE_METRICS)}, got {list(ttr.metrics)}")
    if c.task == "ttr" and ttr.neurons is not None and not os.path.isfile(ttr.neurons):
        _fail("ttr.neurons", f"no file at {ttr.neurons}: a register_neurons.json of task=register_neurons, or null")
    if c.compare is not None and not os.path.exists(c.compare):
        _fail("compare", f"no checkpoint at {c.compare}")
    _validate_ablate(c)
    o = c.outliers
    if o.detector not in DETECTORS:
        _fail("outliers.detector", f"must be fixed, robust_z or valley, got {o.detector!r}")
    if o.features not in FEATURES:
        _fail("outliers.features", f"must be normed or prenorm, got {o.features!r}")
    if o.fit_on not in FIT_ON:
        _fail("outliers.fit_on", f"must be all or group, got {o.fit_on!r}")
    if o.classifier not in CLASSIFIERS:
        _fail("outliers.classifier", f"must be logistic or ridge, got {o.classifier!r}")
    if not 0 < o.test_fraction < 1:
        _fail("outliers.test_fraction", f"must be in (0, 1), got {o.test_fraction}")
    if o.repeats < 1:
        _fail("outliers.repeats", f"must be >= 1, got {o.repeats}")
    occ = c.occlusion
    for key in ("fractions", "faithfulness_fractions"):
        if not occ[key] or any(not 0 <= f < 1 for f in occ[key]):
            _fail(f"occlusion.{key}", f"must be a non-empty list of fractions in [0, 1), got {list(occ[key])}")

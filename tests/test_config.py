"""The composed configs: recipes carry DINOv2's numbers, typos fail at compose time, and
configurations that cannot work fail before any model is built, naming the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from tests.conftest import CONF_DIR, compose_config
from vitreg.config import ConfigError, validate_config
from vitreg.lit.pretrain import pretrain

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("experiment", ["default", *EXPERIMENTS])
def test_defaults_and_every_experiment_compose_and_validate(experiment):
    validate_config(compose_config([] if experiment == "default" else [f"experiment={experiment}"]))


def test_model_and_registers_from_the_command_line():
    cfg = compose_config(["model=vitl", "registers=4"])
    assert cfg.model.arch == "vitl" and cfg.model.num_register_tokens == 4
    # DINOv2's default config (ssl_default_config.yaml)
    assert cfg.ssl.dino.head_n_prototypes == 65536 and cfg.ssl.dino.koleo_loss_weight == 0.1
    assert cfg.ssl.ibot.mask_ratio_min_max == [0.1, 0.5] and cfg.ssl.ibot.mask_sample_probability == 0.5
    assert cfg.ssl.teacher.momentum_teacher == 0.992 and cfg.ssl.teacher.warmup_teacher_temp_epochs == 30
    assert cfg.optim.base_lr == 0.004 and cfg.optim.layerwise_decay == 0.9 and cfg.optim.clip_grad == 3.0
    assert cfg.optim.official_epoch_length == 1250 and cfg.optim.patch_embed_lr_mult == 0.2


def test_dinov2_vitl14_reg4_recipe_values():
    cfg = compose_config(["experiment=dinov2_vitl14_reg4"])
    m = cfg.model
    assert (m.arch, m.patch_size, m.ffn_layer, m.drop_path_rate, m.num_register_tokens) == (
        "vitl",
        14,
        "swiglu",
        0.4,
        4,
    )
    assert (m.interpolate_antialias, m.interpolate_offset) == (True, 0.0)
    assert cfg.ssl.centering == "sinkhorn_knopp"
    assert (cfg.ssl.dino.head_n_prototypes, cfg.ssl.dino.head_bottleneck_dim) == (131072, 384)
    assert cfg.ssl.ibot.separate_head and cfg.ssl.ibot.head_n_prototypes == 131072
    assert cfg.ssl.ibot.head_bottleneck_dim == 256  # not overridden by DINOv2's vitl14.yaml
    assert cfg.ssl.teacher.momentum_teacher == 0.994
    o = cfg.optim
    assert (o.epochs, o.base_lr, o.warmup_epochs, o.weight_decay_end, o.layerwise_decay) == (500, 2e-4, 80, 0.2, 1.0)
    assert cfg.data.batch_size_per_device == 32 and cfg.augment.local_crops_size == 98


def test_sweep_override_beats_the_recipe():
    assert compose_config(["experiment=dinov2_vitl14_reg4", "registers=8"]).model.num_register_tokens == 8


def test_misspelled_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["model.drop_pth_rate=0.1"])
    assert "Key 'drop_pth_rate' not in 'ModelConfig'" in str(err.value.__cause__)


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["model.patch_size=fourteen"])
    assert isinstance(err.value.__cause__, ValidationError) and "patch_size" in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["augment.global_crops_size=100"],
            r"augment\.global_crops_size: 100 is not a multiple of model\.patch_size 14; use e\.g\. 98",
        ),
        (
            ["augment.local_crops_size=96"],
            r"augment\.local_crops_size: 96 is not a multiple of model\.patch_size 14; use e\.g\. 98",
        ),
        (["data.batch_size_per_device=1"], r"ssl\.dino\.koleo_loss_weight: KoLeo needs at least 2 images per device"),
        (["ssl.centering=softmax"], r"ssl\.centering: must be one of \['centering', 'sinkhorn_knopp'\], got 'softmax'"),
        (["registers=-1"], r"registers: must be >= 0 \(0 = no registers\), got -1"),
        (["model.arch=vith"], r"model\.arch: unknown size 'vith'"),
        (["ssl.ibot.mask_ratio_min_max=[0.5,0.1]"], r"ssl\.ibot\.mask_ratio_min_max: must be \[min, max\]"),
        (["ssl.on_nonfinite=ignore"], r"ssl\.on_nonfinite: must be one of \['raise', 'skip'\]"),
        (["optim.warmup_epochs=200"], r"optim\.warmup_epochs: 200 exceeds optim\.epochs 100"),
    ],
)
def test_configs_that_cannot_work_fail_before_any_model_is_built(overrides, message, tmp_path, monkeypatch):
    cfg = compose_config(overrides, run_dir=tmp_path / "run")
    built = []
    monkeypatch.setattr("vitreg.lit.pretrain.DINOv2Module", lambda *a, **k: built.append(1))
    with pytest.raises(ConfigError, match=message):
        pretrain(cfg)
    assert not built and not (tmp_path / "run").exists()


def test_koleo_off_allows_batch_of_one():
    validate_config(compose_config(["data.batch_size_per_device=1", "ssl.dino.koleo_loss_weight=0"]))


# Realistic mistakes -> the key their ConfigError must start with. Grow this table with every new check.
MISTAKES = [
    # model
    (["model.patch_size=0"], "model.patch_size"),
    (["model.patch_size=-14"], "model.patch_size"),
    (["model.arch=vith"], "model.arch"),
    (["model.ffn_layer=geglu"], "model.ffn_layer"),
    (["model.attn_backend=flash"], "model.attn_backend"),
    (["model.attn_bias=qkv"], "model.attn_bias"),
    (["model.drop_path_rate=1.0"], "model.drop_path_rate"),
    (["model.drop_path_rate=-0.1"], "model.drop_path_rate"),
    (["model.register_init_std=-0.02"], "model.register_init_std"),
    (["model.pretrained_weights=/no/such/dinov2_vitl14_reg4_pretrain.pth"], "model.pretrained_weights"),
    (["registers=-1"], "registers"),
    # augment
    (["augment.global_crops_size=100"], "augment.global_crops_size"),
    (["augment.local_crops_size=96"], "augment.local_crops_size"),
    (["augment.local_crops_number=-1"], "augment.local_crops_number"),
    (["augment.global_crops_scale=[0.5,0.3]"], "augment.global_crops_scale"),
    (["augment.local_crops_scale=[0.05]"], "augment.local_crops_scale"),
    (["augment.blur_probabilities=0.5"], "augment.blur_probabilities"),
    (["augment.blur_probabilities=[0.3,1.5,0.1]"], "augment.blur_probabilities"),
    (["augment.solarize_prob=1.5"], "augment.solarize_prob"),
    # ssl
    (["ssl.centering=softmax"], "ssl.centering"),
    (["ssl.student_temp=0"], "ssl.student_temp"),
    (["ssl.teacher.teacher_temp=0"], "ssl.teacher.teacher_temp"),
    (["ssl.teacher.warmup_teacher_temp=-0.04"], "ssl.teacher.warmup_teacher_temp"),
    (["ssl.teacher.warmup_teacher_temp_epochs=-1"], "ssl.teacher.warmup_teacher_temp_epochs"),
    (["ssl.teacher.momentum_teacher=1.2"], "ssl.teacher.momentum_teacher"),
    (["ssl.center_momentum=1.5"], "ssl.center_momentum"),
    (["ssl.sinkhorn_iterations=0"], "ssl.sinkhorn_iterations"),
    (["ssl.on_nonfinite=ignore"], "ssl.on_nonfinite"),
    (["ssl.max_skipped_steps=0"], "ssl.max_skipped_steps"),
    (["ssl.max_skipped_steps=2.5"], "ssl.max_skipped_steps"),
    (["ssl.dino.loss_weight=-1"], "ssl.dino.loss_weight"),
    (["ssl.dino.loss_weight=0", "ssl.ibot.loss_weight=0"], "ssl.dino.loss_weight"),
    (["ssl.ibot.loss_weight=-1"], "ssl.ibot.loss_weight"),
    (["ssl.dino.koleo_loss_weight=-0.1"], "ssl.dino.koleo_loss_weight"),
    (["data.batch_size_per_device=1"], "ssl.dino.koleo_loss_weight"),
    (["ssl.dino.head_n_prototypes=0"], "ssl.dino.head_n_prototypes"),
    (["ssl.ibot.mask_ratio_min_max=[0.5,0.1]"], "ssl.ibot.mask_ratio_min_max"),
    (["ssl.ibot.mask_ratio_min_max=[0.1]"], "ssl.ibot.mask_ratio_min_max"),
    (["ssl.ibot.mask_sample_probability=1.5"], "ssl.ibot.mask_sample_probability"),
    # optim
    (["optim.base_lr=0"], "optim.base_lr"),
    (["optim.min_lr=-1e-6"], "optim.min_lr"),
    (["optim.min_lr=0.002"], "optim.min_lr"),  # below base_lr 0.004, above its peak for 64 images per device
    (["optim.weight_decay=-0.04"], "optim.weight_decay"),
    (["optim.weight_decay_end=-0.4"], "optim.weight_decay_end"),
    (["optim.layerwise_decay=0"], "optim.layerwise_decay"),
    (["optim.layerwise_decay=1.5"], "optim.layerwise_decay"),
    (["optim.clip_grad=-1"], "optim.clip_grad"),
    (["optim.patch_embed_lr_mult=-0.2"], "optim.patch_embed_lr_mult"),
    (["optim.adamw_beta1=1.0"], "optim.adamw_beta1"),
    (["optim.adamw_beta2=-0.5"], "optim.adamw_beta2"),
    (["optim.epochs=0"], "optim.epochs"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    (["optim.warmup_epochs=200"], "optim.warmup_epochs"),
    (["optim.freeze_last_layer_epochs=-1"], "optim.freeze_last_layer_epochs"),
    (["optim.freeze_last_layer_epochs=200"], "optim.freeze_last_layer_epochs"),
    (["optim.scaling_rule=linear"], "optim.scaling_rule"),
    # data
    (["data.name=imagenet"], "data.name"),
    (["data.batch_size_per_device=0"], "data.batch_size_per_device"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data=webdataset"], "data.webdataset.shards"),
    (["data.webdataset.shuffle_buffer=0"], "data.webdataset.shuffle_buffer"),
    (["data.webdataset.max_skip_fraction=1.5"], "data.webdataset.max_skip_fraction"),
    (["data.webdataset.max_unusable_in_a_row=0"], "data.webdataset.max_unusable_in_a_row"),
    (["data.webdataset.missing_shards=ignore"], "data.webdataset.missing_shards"),
    (["data.webdataset.min_image_side=0"], "data.webdataset.min_image_side"),
    (["data.synthetic.num_classes=20"], "data.synthetic.num_classes"),
    (["data.synthetic.image_size=8"], "data.synthetic.image_size"),
    # trainer
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    (["trainer.peak_tflops=0"], "trainer.peak_tflops"),
    (["augment.crops_dtype=float16"], "augment.crops_dtype"),
    (["trainer=ddp", "trainer.ddp.comm_hook=fp8"], "trainer.ddp.comm_hook"),
    (["trainer=fsdp", "trainer.fsdp.prefetch=-1"], "trainer.fsdp.prefetch"),
    (["trainer.progress=tqdm"], "trainer.progress"),
    (["trainer=cpu", "trainer.precision=16-mixed"], "trainer.precision"),
    (["trainer.precision=16-mixed"], "trainer.precision"),  # accelerator auto, no GPU (the test hides it)
    (["trainer.precision=fp16"], "trainer.precision"),
    (["trainer.accelerator=gpus"], "trainer.accelerator"),
    (["trainer.devices=0"], "trainer.devices"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.num_nodes=0"], "trainer.num_nodes"),
    (["trainer=fsdp", "trainer.precision=bf16-mixed"], "trainer.precision"),
    (["trainer=ddp", "ssl.on_nonfinite=skip"], "ssl.on_nonfinite"),
    # run, paths, resume
    (["run_name=../escape"], "run_name"),
    (["run_name=a/../../escape"], "run_name"),
    (["run_name=/tmp/elsewhere"], "run_name"),
    (["run_name="], "run_name"),
    (["run_name=."], "run_name"),
    (["run_id=a/b"], "run_id"),
    (["seed=-1"], "seed"),
    (["resume=latest"], "resume"),
    (["ckpt_path=/no/such/last.ckpt"], "ckpt_path"),
    (["resume_allow_changes=[data.webdataset.shard]"], "resume_allow_changes"),
    (["resume_allow_changes=[batch_size]"], "resume_allow_changes"),
    (["runtime.signals=[SIGFOO]"], "runtime.signals"),
    # callbacks and logger
    (["callbacks.checkpoint_every_n_steps=0"], "callbacks.checkpoint_every_n_steps"),
    (["callbacks.keep_last_k=0"], "callbacks.keep_last_k"),
    (["callbacks.telemetry.every_n_steps=0"], "callbacks.telemetry.every_n_steps"),
    (["callbacks.telemetry.resolutions=[100]"], "callbacks.telemetry.resolutions"),
    (["callbacks.telemetry.models=[ema]"], "callbacks.telemetry.models"),
    (["callbacks.telemetry.media_style=fast"], "callbacks.telemetry.media_style"),
    (["callbacks.telemetry.alert_outlier_fraction=1.5"], "callbacks.telemetry.alert_outlier_fraction"),
    (["callbacks.telemetry.neuron_top_k=0"], "callbacks.telemetry.neuron_top_k"),
    (["callbacks.telemetry.neuron_num_images=0"], "callbacks.telemetry.neuron_num_images"),
    (["model=vitt", "callbacks.telemetry.neuron_outlier_layer=12"], "callbacks.telemetry.neuron_outlier_layer"),
    (["model=vitt", "callbacks.telemetry.neuron_highest_layer=-13"], "callbacks.telemetry.neuron_highest_layer"),
    (["callbacks.online_knn.enabled=true", "callbacks.online_knn.ks=[0]"], "callbacks.online_knn.ks"),
    (["callbacks.online_linear.enabled=true", "callbacks.online_linear.lr=0"], "callbacks.online_linear.lr"),
    (["logger.kind=mlflow"], "logger.kind"),
    (["+logger.enabled.tensorbord=true"], "logger.enabled.tensorbord"),
    (["logger.wandb.id=a/b"], "logger.wandb.id"),
]


@pytest.mark.parametrize(("overrides", "key"), MISTAKES, ids=[" ".join(o) for o, _ in MISTAKES])
def test_every_mistake_fails_at_validation_naming_its_key(overrides, key, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the same verdicts on a GPU machine
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value).startswith(f"{key}: "), str(err.value)


# Boundary values that are right and must stay accepted (a check that refuses them is wrong).
ACCEPTED = [
    ["model.drop_path_rate=0"],
    ["optim.layerwise_decay=1.0", "optim.clip_grad=0", "optim.min_lr=0", "optim.weight_decay=0"],
    ["optim.min_lr=0.001"],  # exactly the peak for 64 images per device: a constant lr after warmup
    ["ssl.max_skipped_steps=0.05"],
    ["ssl.max_skipped_steps=3"],
    ["ssl.center_momentum=1.0", "ssl.centering=sinkhorn_knopp", "ssl.sinkhorn_iterations=1"],
    ["data.num_workers=0", "data.webdataset.missing_shards=warn", "data.webdataset.shuffle_buffer=1"],
    ["run_name=vitl/regs4"],
    ["trainer=cpu", "trainer.precision=bf16-mixed"],
    ["trainer.devices=-1"],
    ["resume_allow_changes=[data.webdataset.shards,seed]"],
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(o) for o in ACCEPTED])
def test_right_boundary_values_still_validate(overrides, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    validate_config(compose_config(overrides))


def test_16_mixed_is_accepted_where_a_gpu_will_run_it(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    validate_config(compose_config(["trainer.precision=16-mixed"]))


def test_existing_pretrained_weights_file_is_accepted(tmp_path):
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"")
    validate_config(compose_config([f"model.pretrained_weights={weights}"]))


@pytest.mark.slow
def test_cli_prints_config_and_reports_bad_input(tmp_path):
    shown = subprocess.run(
        [sys.executable, "train/pretrain.py", "model=vitl", "registers=4", "--cfg", "job", "--resolve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "arch: vitl" in shown.stdout and "num_register_tokens: 4" in shown.stdout
    bad = subprocess.run(
        [sys.executable, "train/pretrain.py", "experiment=demo", "registers=-2", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "config error: registers: must be >= 0" in bad.stderr


def test_blur_probabilities_per_view():
    from vitreg.lit.data import multicrop_transform

    cfg = compose_config(["augment.blur_probabilities=[0.3,0.2,0.1]"])
    validate_config(cfg)
    t = multicrop_transform(cfg)
    assert (t.global1_blur_prob, t.global2_blur_prob, t.local_blur_prob) == (0.3, 0.2, 0.1)
    assert multicrop_transform(compose_config([])).global2_blur_prob == 0.9  # DINOv2's effective default
    with pytest.raises(ConfigError, match=r"augment\.blur_probabilities: must be 3 probabilities"):
        validate_config(compose_config(["augment.blur_probabilities=[0.3,1.5,0.1]"]))
    with pytest.raises(ConfigError, match=r"augment\.blur_probabilities: use dinov2, intended"):
        validate_config(compose_config(["augment.blur_probabilities=fixed"]))

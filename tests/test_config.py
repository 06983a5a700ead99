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


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    validate_config(compose_config([f"experiment={experiment}"]))


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

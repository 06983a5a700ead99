"""Shared fixtures: compose the real Hydra configs in conf/ (what train/pretrain.py uses)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from vitreg.config import register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A tiny but complete run: the demo recipe shrunk so a step takes well under a second on CPU.
TINY = [
    "experiment=demo",
    "ssl.centering=centering",  # DINOv2's default (the demo uses Sinkhorn-Knopp; tests cover both)
    "augment.global_crops_size=28",
    "augment.local_crops_size=14",
    "augment.local_crops_number=2",
    "data.batch_size_per_device=4",
    "data.num_workers=0",
    "data.synthetic.num_images=64",
    "data.synthetic.image_size=32",
    "data.synthetic.knn_train_images=40",
    "data.synthetic.knn_val_images=20",
    "ssl.dino.head_n_prototypes=64",
    "ssl.dino.head_hidden_dim=32",
    "ssl.dino.head_bottleneck_dim=16",
    "ssl.ibot.head_n_prototypes=64",
    "ssl.ibot.head_hidden_dim=32",
    "ssl.ibot.head_bottleneck_dim=16",
    "optim.official_epoch_length=5",
    "optim.epochs=2",
    "trainer.enable_progress_bar=false",
    "callbacks.online_knn.enabled=false",
    "callbacks.telemetry.num_images=8",
]


def compose_config(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides or [])
    with open_dict(cfg):
        # generated shards are keyed by their parameters, so tests can share one cache outside the repo
        cfg.paths.cache_dir = str(Path(tempfile.gettempdir()) / "vitreg-test-cache")
        if run_dir is not None:
            cfg.paths.run_dir = str(run_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path) -> DictConfig:
    return compose_config(TINY, run_dir=tmp_path / "run")


def write_class_folders(root: Path, num_images: int, image_size: int, num_classes: int, seed: int) -> Path:
    """Synthetic JPEGs in class folders (``root/images/<class>/<i>.jpg``), as a user's photo folder."""
    from PIL import Image

    from vitreg.data.synthetic import SyntheticShapes

    images = SyntheticShapes(num_images, image_size=image_size, num_classes=num_classes, seed=seed)
    for i in range(len(images)):
        img, label = images.render(i)
        folder = root / "images" / images.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)
    return root / "images"


@pytest.fixture
def hang_guard(monkeypatch):
    """Fail (instead of hanging forever) when a stream reads more than 20,000 raw samples without
    stopping; loader workers are forked, so they inherit the guard."""
    import vitreg.data.webdataset as wdsmod

    real = wdsmod.iter_tar_samples
    read = [0]

    def guarded(url, skips):
        for sample in real(url, skips):
            read[0] += 1
            if read[0] > 20_000:
                raise AssertionError("the stream read 20,000 samples without a usable one and did not stop: a hang")
            yield sample

    monkeypatch.setattr(wdsmod, "iter_tar_samples", guarded)
    return read

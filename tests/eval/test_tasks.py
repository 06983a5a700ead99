"""train/analyze.py's evaluation tasks end to end: official-layout checkpoints in, <task>.json out.

The metrics themselves are checked against known answers in their own test files; here the known
answers come through the whole path (checkpoint file -> model -> task -> JSON): a model built to find
checkerboard objects reaches CorLoc 100 %, planted artifacts are the outliers of the local probe, and
two processes give the numbers of one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.eval.test_lost import checkerboard_image, keyed_vit
from tests.telemetry.planted import planted_vit
from vitreg.config import ConfigError, register_configs, to_dataclass, validate_analyze_config
from vitreg.eval.tasks import EVALUATIONS, AnalyzeConfig, run_task
from vitreg.models.checkpoint import save_dinov2_checkpoint
from vitreg.models.vision_transformer import build_vit

REPO = Path(__file__).resolve().parents[2]
PLANTED = [5, 18, 27, 44]  # of planted_vit's 8 x 8 grid


def analyze_cfg(overrides: list[str]) -> AnalyzeConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="analyze", overrides=overrides)
    validate_analyze_config(cfg)
    return to_dataclass(AnalyzeConfig, cfg)


TINY_DATA = [
    "data.resolution=28",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.synthetic_images=40",
    "data.synthetic_image_size=32",
    "data.synthetic_classes=4",
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vitt_reg4.pth"
    model = build_vit("vitt", num_register_tokens=4, patch_size=14, img_size=28, layerscale_init=None)
    save_dinov2_checkpoint(model, path)
    return path


def run(cfg: AnalyzeConfig, out: Path) -> dict:
    path, payload = run_task(cfg, out, torch.device("cpu"))
    assert path == out / f"{cfg.task}.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["task"] == cfg.task and on_disk["num_register_tokens"] == payload["num_register_tokens"]
    assert EVALUATIONS[cfg.task].summary(on_disk["result"])  # the console summary reads the JSON's shape
    return on_disk


def test_knn_task_writes_every_k(tiny_checkpoint, tmp_path):
    cfg = analyze_cfg(["task=knn", f"checkpoint={tiny_checkpoint}", "knn.ks=[1,5]", *TINY_DATA])
    payload = run(cfg, tmp_path)
    result = payload["result"]
    assert {"k=1", "k=5", "best"} <= set(result) and result["num_train"] == result["num_val"] == 40
    assert payload["source"] == "dinov2" and payload["settings"]["knn"]["ks"] == [1, 5]


def test_linear_task_saves_the_best_classifier(tiny_checkpoint, tmp_path):
    cfg = analyze_cfg(
        ["task=linear", f"checkpoint={tiny_checkpoint}", "linear.mode=cached", "linear.epochs=2", *TINY_DATA]
    )
    cfg.linear.learning_rates = [0.01, 0.1]
    cfg.linear.batch_size = 8
    result = run(cfg, tmp_path)["result"]
    assert len(result["classifiers"]) == 2 * 2 * 2  # n_last_blocks x avgpool x lrs
    best = torch.load(tmp_path / "linear_best.pt", weights_only=True)
    assert best["config"]["name"] == result["best"]["name"]


def write_checkerboard_csv(folder: Path) -> Path:
    boxes = [(8, 16, 40, 40), (0, 0, 24, 16), (32, 8, 64, 32)]
    rows = []
    for i, box in enumerate(boxes):
        Image.fromarray(checkerboard_image(48, 64, box).permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
        rows.append([f"img{i}.png", *box])
    path = folder / "boxes.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["file", "x0", "y0", "x1", "y1"], *rows])
    return path


def test_lost_task_finds_the_constructed_objects(tmp_path):
    checkpoint = tmp_path / "keyed.pth"
    save_dinov2_checkpoint(keyed_vit(num_registers=4), checkpoint)
    dataset = write_checkerboard_csv(tmp_path)
    cfg = analyze_cfg(
        ["task=lost", f"checkpoint={checkpoint}", f"lost.dataset={dataset}", "lost.layer=0", "lost.num_examples=2"]
    )
    result = run(cfg, tmp_path / "out")["result"]
    assert result["corloc"] == 100.0 and result["num_images"] == 3 and result["fallbacks"] == 0
    assert (tmp_path / "out" / "lost_examples.png").stat().st_size > 0


def test_lost_task_defaults_to_generated_images(tiny_checkpoint, tmp_path):
    cfg = analyze_cfg(["task=lost", f"checkpoint={tiny_checkpoint}", "lost.generated_images=3", "lost.sweep=true"])
    cfg.lost = dataclasses.replace(cfg.lost, sweep_layers=[-1, 0], sweep_kinds=["k", "out"], num_examples=0)
    result = run(cfg, tmp_path)["result"]
    assert result["num_images"] == 3 and len(result["sweep"]["settings"]) == 4
    assert (tmp_path / "lost_generated" / "boxes.json").exists()


@pytest.fixture(scope="module")
def planted_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("planted") / "planted.pth"
    save_dinov2_checkpoint(planted_vit(num_registers=4, patches=PLANTED, block=5), path)
    return path


def test_local_task_finds_exactly_the_planted_outliers(planted_checkpoint, tmp_path):
    cfg = analyze_cfg(
        [
            "task=local",
            f"checkpoint={planted_checkpoint}",
            "num_images=16",
            "outliers.min_outliers=4",
            "data.resolution=112",
        ]
    )
    result = run(cfg, tmp_path)["result"]
    assert result["outlier_fraction"] == pytest.approx(len(PLANTED) / 64)  # registers never counted as patches
    assert result["position"]["outlier"] is not None and result["position"]["normal"]["count"] > 0
    assert (tmp_path / "local_probes.png").exists()


def test_register_neurons_task_finds_the_planted_neuron_in_an_official_layout_file(planted_checkpoint, tmp_path):
    cfg = analyze_cfg(
        ["task=register_neurons", f"checkpoint={planted_checkpoint}", "num_images=4", "data.resolution=112"]
    )
    payload = run(cfg, tmp_path)
    first = payload["result"]["neurons"][0]
    assert (first["layer"], first["neuron"]) == (5, 0)  # planted_vit: neuron 0 of block 5
    assert payload["result"]["outlier_fraction"] == pytest.approx(len(PLANTED) / 64)
    assert payload["settings"]["register_neurons"]["top_k"] == 50
    assert (tmp_path / "register_neurons.json").exists()


def test_global_task_probes_cls_each_register_and_outliers(planted_checkpoint, tmp_path):
    cfg = analyze_cfg(
        [
            "task=global",
            f"checkpoint={planted_checkpoint}",
            "outliers.classifier=ridge",
            "outliers.repeats=2",
            "outliers.min_outliers=2",
            *TINY_DATA,
            "data.resolution=112",
        ]
    )
    result = run(cfg, tmp_path)["result"]["global"]
    assert set(result) == {"cls", "normal", "outlier", "register_0", "register_1", "register_2", "register_3"}
    assert result["outlier"]["count"] == 40  # every image has the planted outliers


def test_occlusion_task_is_exactly_one_without_occlusion(tiny_checkpoint, tmp_path):
    cfg = analyze_cfg(["task=occlusion", f"checkpoint={tiny_checkpoint}", "num_images=4", "data.resolution=28"])
    cfg.occlusion = dataclasses.replace(cfg.occlusion, fractions=[0.0, 0.5], faithfulness_fractions=[0.25])
    result = run(cfg, tmp_path)["result"]
    clean = result["random"]["by_fraction"]["0"]
    assert clean["final_cls"] == pytest.approx(1.0, abs=1e-6) and all(v == pytest.approx(1.0) for v in clean["cls"])
    assert result["random"]["by_fraction"]["0.5"]["final_cls"] < 1.0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("task=bogus", "task"),
        ("linear.mode=fast", "linear.mode"),
        ("lost.kind=x", "lost.kind"),
        ("knn.ks=[0]", "knn.ks"),
        ("outliers.detector=gmm", "outliers.detector"),
        ("occlusion.fractions=[1.0]", "occlusion.fractions"),
        ("data.synthetic_classes=1", "data.synthetic_classes"),
        ("register_neurons.detector=otsu", "register_neurons.detector"),
        ("register_neurons.top_k=0", "register_neurons.top_k"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_key(tiny_checkpoint, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        analyze_cfg([f"checkpoint={tiny_checkpoint}", override])


def test_missing_sources_are_named(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.val"):
        analyze_cfg(["task=knn", f"checkpoint={tiny_checkpoint}", f"data.val={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"lost\.dataset"):
        analyze_cfg(["task=lost", f"checkpoint={tiny_checkpoint}", f"lost.dataset={tmp_path / 'nope.json'}"])


def analyze_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train" / "analyze.py"), *args]


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tiny_checkpoint, tmp_path):
    """torchrun train/analyze.py task=knn: the bank is sharded over 2 gloo processes, the result is not."""
    args = ["task=knn", f"checkpoint={tiny_checkpoint}", "knn.ks=[1,3,10]", *TINY_DATA, "data.synthetic_images=41"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        analyze_command(*args, f"out={tmp_path / 'one'}"), capture_output=True, text=True, env=env, timeout=300
    )
    assert one.returncode == 0, one.stderr
    assert "k=3: top-1" in one.stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    two = subprocess.run(
        [*torchrun, *analyze_command(*args, f"out={tmp_path / 'two'}")[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    first, second = (json.loads((tmp_path / d / "knn.json").read_text()) for d in ("one", "two"))
    assert second["world_size"] == 2 and first["world_size"] == 1
    assert first["result"]["num_train"] == second["result"]["num_train"] == 41
    for k in ("k=1", "k=3", "k=10"):
        assert first["result"][k] == second["result"][k]


@pytest.mark.slow
def test_entry_point_prints_a_summary_and_refuses_bad_data(tiny_checkpoint, tmp_path):
    ok = subprocess.run(
        analyze_command("task=occlusion", f"checkpoint={tiny_checkpoint}", "num_images=2", f"out={tmp_path}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "random PatchDrop 0.25" in ok.stdout and (tmp_path / "occlusion.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run(
        analyze_command("task=knn", f"checkpoint={tiny_checkpoint}", f"data.train={empty}", f"out={tmp_path}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "knn failed" in bad.stderr and str(empty) in bad.stderr

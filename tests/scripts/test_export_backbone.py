import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, compose_config
from tests.utils.test_sharded import backbone, sharded  # noqa: F401 (a module-scoped fixture)
from vitreg.lit.pretrain import pretrain
from vitreg.models import build_vit, load_dinov2_backbone, save_dinov2_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_export_writes_the_teacher_in_the_official_layout(tmp_path):
    run = tmp_path / "run"
    pretrain(compose_config([*TINY, "trainer.max_steps=2", "callbacks.checkpoint_every_n_steps=2"], run_dir=run))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_backbone.py"), str(run)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    exported = run / "export" / "last_teacher_hub.pth"
    state = torch.load(exported, weights_only=True)
    assert "register_tokens" in state and not any(k.startswith(("dino_head", "student", "objective")) for k in state)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    teacher = {k.removeprefix("objective.teacher.backbone."): v for k, v in ckpt["state_dict"].items()
               if k.startswith("objective.teacher.backbone.")}  # fmt: skip
    assert set(state) == set(teacher)
    for key, value in teacher.items():
        assert torch.equal(state[key], value), key
    model = load_dinov2_backbone(exported)
    assert model.num_register_tokens == 4
    assert "interpolate_antialias=True" in result.stdout


def test_export_of_a_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        export_main([str(tmp_path / "nope.ckpt")])
    with pytest.raises(SystemExit, match="no checkpoint in"):
        export_main([str(tmp_path)])


# ------------------------------------------------------------------ formats, sharded checkpoints
def export_main(argv: list[str]) -> Path:
    """The script's main() in this process (a subprocess per case would cost seconds of imports)."""
    spec = importlib.util.spec_from_file_location("export_backbone_script", REPO / "scripts" / "export_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("level", ["run_dir", "checkpoint_dir"])
def test_a_sharded_fsdp2_checkpoint_exports(sharded, level):  # noqa: F811 (the fixture)
    """Before: 'error: no checkpoint in .../last.ckpt' for the directory itself, and 'could not read ... as a
    weights-only checkpoint (IsADirectoryError)' through the run directory."""
    run = sharded.parents[1]
    out = export_main([str(run if level == "run_dir" else sharded)])
    assert out == run / "export" / "last_teacher_hub.pth"
    state = torch.load(out, weights_only=True)
    expected = backbone(0).state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], v) for k, v in expected.items())


def test_hf_and_timm_exports_record_the_run_and_print_how_to_load_them(sharded, tmp_path, capsys):  # noqa: F811
    out = export_main([str(sharded), "--format", "hf", "--which", "student", "--out", str(tmp_path / "hf")])
    printed = capsys.readouterr().out
    assert f"transformers.Dinov2WithRegistersModel.from_pretrained({str(out)!r})" in printed
    record = json.loads((out / "vitreg_export.json").read_text())["model.safetensors"]
    assert record["source"]["step"] == 7 and record["source"]["which"] == "student"
    assert record["source"]["run_dir"] == str(sharded.parents[1].resolve())
    assert (record["num_register_tokens"], record["num_heads"], record["interpolation"]["antialias"]) == (4, 2, True)
    assert set(record["vitreg_code"]) == {"commit", "modified"}
    timm_file = tmp_path / "vitt.safetensors"
    export_main([str(sharded), "--format", "timm", timm_file.as_posix()])
    printed = capsys.readouterr().out
    assert "import timm, torch\n  model = timm.create_model('vit_small_patch14_reg4_dinov2', pretrained=True" in printed
    assert f"pretrained_cfg_overlay=dict(file={str(timm_file.resolve())!r})" in printed
    records = json.loads((tmp_path / "vitreg_export.json").read_text())
    assert set(records) == {"vitt.safetensors"} and records["vitt.safetensors"]["format"] == "timm"


def test_legacy_interpolation_is_warned_about(tmp_path, capsys):
    model = build_vit("vitt", embed_dim=64, depth=1, num_heads=1, img_size=28)  # 0 registers: offset 0.1
    save_dinov2_checkpoint(model, tmp_path / "r0.pth")
    export_main([str(tmp_path / "r0.pth"), "--format", "hf", "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert "warning: this model resamples its positional embeddings with interpolate_antialias=False" in err
    assert "differ at other image sizes" in err


def test_bad_combinations_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main([str(tmp_path), "--format", "hf", "--layout", "chunked"])
    assert "--layout applies to --format dinov2 only" in capsys.readouterr().err
    model = build_vit("vitt", embed_dim=64, depth=1, num_heads=1, img_size=28, num_register_tokens=1)
    save_dinov2_checkpoint(model, tmp_path / "r1.pth")
    with pytest.raises(SystemExit, match=r"writes a \.safetensors file"):
        export_main([str(tmp_path / "r1.pth"), "--format", "timm", "--out", str(tmp_path / "x.pth")])


@pytest.mark.slow
def test_the_hf_one_liner_runs_as_a_user_types_it(sharded, tmp_path):  # noqa: F811
    cmd = [sys.executable, str(REPO / "scripts" / "export_backbone.py"), str(sharded.parents[1])]
    result = subprocess.run([*cmd, "--format", "hf", "--out", str(tmp_path / "hf")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "config.json").is_file() and "from_pretrained" in result.stdout


def test_an_export_with_test_time_registers_records_them(tmp_path, capsys):
    from vitreg.models import TestTimeRegisters

    model = build_vit("vitt", embed_dim=64, depth=2, num_heads=1, img_size=28, num_register_tokens=1)
    save_dinov2_checkpoint(model, tmp_path / "plain.pth")
    ttr_json = tmp_path / "ttr.json"  # as task=ttr writes it: the neurons, and the settings it ran with
    ttr_json.write_text(
        json.dumps(
            {
                "settings": {"ttr": {"num_tokens": 3, "scale": 2.0, "patch_values": "mean"}},
                "result": {"neurons": [{"layer": 1, "neuron": 5, "score": 9.0}]},
            }
        )
    )
    out = export_main([str(tmp_path / "plain.pth"), str(tmp_path / "ttr.pth"), "--test-time-registers", str(ttr_json),
                       "--ttr-scale", "1.5"])  # fmt: skip
    again = load_dinov2_backbone(out)
    assert isinstance(again, TestTimeRegisters) and again.neurons == [(1, 5)]
    assert (again.settings.num_tokens, again.settings.scale, again.settings.patch_values) == (3, 1.5, "mean")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match=r"--test-time-registers: .* is not the JSON of task=register_neurons"):
        export_main([str(tmp_path / "plain.pth"), str(tmp_path / "x.pth"), "--test-time-registers", str(bad)])
    with pytest.raises(SystemExit, match=r"neuron 256\) does not exist"):
        bad.write_text(json.dumps({"result": {"neurons": [{"layer": 0, "neuron": 256}]}}))
        export_main([str(tmp_path / "plain.pth"), str(tmp_path / "x.pth"), "--test-time-registers", str(bad)])

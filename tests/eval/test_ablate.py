"""Replacement-controlled ablations (``task=ablate``) against known answers.

- a ViT built so that its registers never see the image: replacing them by their reference mean, matched
  noise or another image's registers changes nothing, zeroing them changes the output;
- the four replacements on small hand-made populations: exact zeros and means, shuffles that are reference
  samples (one image per forward, fixed by the seed), noise matched in mean and std;
- planted outliers (``planted_vit``): the outlier target edits exactly the planted patches, nowhere else;
- the task end to end on a vitreg training checkpoint and an official-layout DINOv2 file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.assets.make_checkpoint_v1 import ASSET_VITT
from tests.eval.test_tasks import TINY_DATA, analyze_cfg
from tests.telemetry.planted import IMG, planted_vit, probe_images
from vitreg.config import ConfigError
from vitreg.data.probe import probe_tensor
from vitreg.eval.ablate import (
    AblateSettings,
    Population,
    ReferenceDraws,
    ablation_edits,
    missing_target,
    reference_statistics,
    replacement_tokens,
)
from vitreg.eval.tasks import EVALUATIONS, run_task
from vitreg.models.checkpoint import save_dinov2_checkpoint
from vitreg.models.vision_transformer import VisionTransformer, build_vit

PLANTED = [3, 12, 40, 51]  # of planted_vit's 8 x 8 grid; outliers from block 5's output on
ASSET_CHECKPOINT = Path(__file__).parents[1] / "assets" / "checkpoint_v1" / "last.ckpt"  # a vitreg training file


def images(n: int, seed: int = 0, size: int = IMG) -> torch.Tensor:
    return probe_tensor(probe_images(n, seed), IMG)[..., :size, :size]


@torch.no_grad()
def isolated_register_vit(num_registers: int = 2, gain: float = 10.0) -> VisionTransformer:
    """Registers whose outputs do not depend on the image. Channel 0 is a marker: huge on the registers, 0
    on CLS and patches, and no block writes it. In every block and head one query and one key dimension read
    only that channel (after norm1), so a register's query scores the registers thousands of logits above
    every other key: its attention weight on CLS and patches underflows to exactly 0, and registers are
    computed from registers alone. CLS and patches still read the registers, so their values matter."""
    torch.manual_seed(0)
    model = build_vit("vitt", num_register_tokens=num_registers, patch_size=14, img_size=56, layerscale_init=None)
    model.eval()
    d, heads = model.embed_dim, model.blocks[0].attn.num_heads
    head_dim = d // heads
    model.patch_embed.proj.weight[0] = 0
    model.patch_embed.proj.bias[0] = 0
    model.cls_token[..., 0] = 0
    model.pos_embed[..., 0] = 0
    model.register_tokens[..., 0] = 1000.0
    for blk in model.blocks:
        blk.attn.proj.weight[0] = 0
        blk.attn.proj.bias[0] = 0
        blk.mlp.fc2.weight[0] = 0
        blk.mlp.fc2.bias[0] = 0
        for h in range(heads):
            for row in (h * head_dim, d + h * head_dim):  # one query and one key dimension of head h
                blk.attn.qkv.weight[row] = 0
                blk.attn.qkv.weight[row, 0] = gain
                blk.attn.qkv.bias[row] = 0
    return model


def run_edited(model: VisionTransformer, x: torch.Tensor, edits=None) -> dict[str, torch.Tensor]:
    with torch.no_grad(), model.edit(outputs=edits or {}):
        return model.forward_features(x)


def test_input_independent_registers_mean_noise_and_shuffle_change_nothing_zero_does():
    model = isolated_register_vit()
    layout = model.layout
    x = images(3, seed=1, size=56)
    # the construction: each block's registers are the same for every image
    for layer in model.forward_intermediates(x, model.n_blocks).values():
        regs = layout.registers(layer.tokens)
        torch.testing.assert_close(regs, regs[:1].expand_as(regs), rtol=1e-5, atol=1e-4)
    blocks = list(range(model.n_blocks))
    stats = reference_statistics(model, [images(4, seed=2, size=56)], blocks)
    plain = run_edited(model, x)
    for kind in ("mean", "noise", "shuffle"):
        out = run_edited(model, x, ablation_edits(layout, "registers", kind, stats, seed=3))
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"):
            torch.testing.assert_close(out[key], plain[key], rtol=1e-4, atol=1e-4, msg=f"{kind}: {key}")
    zeroed = run_edited(model, x, ablation_edits(layout, "registers", "zero", stats))
    assert (zeroed["x_norm_clstoken"] - plain["x_norm_clstoken"]).abs().max() > 0.1
    assert (zeroed["x_norm_patchtokens"] - plain["x_norm_patchtokens"]).abs().max() > 0.1


def test_replacements_by_hand():
    samples = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)  # 3 images, 2 registers, 4 channels
    population = Population(samples)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(replacement_tokens("zero", population, 5, g), torch.zeros(5, 2, 4))
    assert torch.equal(replacement_tokens("mean", population, 5, g), samples[1].expand(5, 2, 4))  # arange: mean=mid
    picks = torch.tensor([2, 0, 2])
    assert torch.equal(replacement_tokens("shuffle", population, 3, g, picks), samples[picks])
    drawn = replacement_tokens("shuffle", population, 200, g)
    which = [int(row[0, 0]) // 8 for row in drawn]  # every row is a whole reference image's registers
    assert torch.equal(drawn, samples[which]) and set(which) == {0, 1, 2}
    with pytest.raises(ValueError, match="replacement must be one of"):
        replacement_tokens("blur", population, 1, g)


def test_noise_matches_the_population_mean_and_std_per_slot_and_channel():
    g = torch.Generator().manual_seed(1)
    mean = torch.tensor([[5.0, -2.0, 0.0], [100.0, 1.0, -7.0]])
    std = torch.tensor([[1.0, 3.0, 0.1], [10.0, 0.5, 2.0]])
    population = Population(mean + std * torch.randn(5000, 2, 3, generator=g))
    draws = replacement_tokens("noise", population, 40000, g)
    # 40000 draws: the sample mean is within 4 standard errors (std / 200) of the population's, the std within 2 %
    assert ((draws.mean(0) - population.mean).abs() <= 4 * population.std / 200).all()
    assert ((draws.std(0) / population.std - 1).abs() < 0.02).all()


def test_shuffle_takes_one_reference_image_per_forward_fixed_by_the_seed():
    draws = ReferenceDraws(num_reference=50, first_block=2, generator=torch.Generator().manual_seed(0))
    first = draws.for_block(2, 4)
    assert torch.equal(draws.for_block(5, 4), first) and torch.equal(draws.for_block(7, 4), first)
    second = draws.for_block(2, 4)  # the next forward draws again
    assert not torch.equal(second, first)
    again = ReferenceDraws(50, 2, torch.Generator().manual_seed(0))
    assert torch.equal(again.for_block(2, 4), first)
    assert len(draws.for_block(5, 1)) == 1  # batch size 1 works

    model = planted_vit(4)
    stats = reference_statistics(model, [images(6)], [3, 4])
    x = images(1, seed=9)
    with torch.no_grad(), model.edit(outputs=ablation_edits(model.layout, "registers", "shuffle", stats, seed=4)):
        layers = model.forward_intermediates(x, [3, 4])
    reference = {b: stats.registers[b].samples for b in (3, 4)}
    got = {b: model.layout.registers(layers[b].tokens)[0] for b in (3, 4)}
    pick = [i for i in range(6) if torch.equal(got[3], reference[3][i])]
    assert len(pick) == 1 and torch.equal(got[4], reference[4][pick[0]])  # the same reference image at both


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_the_outlier_target_edits_exactly_the_planted_patches(kind):
    model = planted_vit(4, patches=PLANTED, block=5)
    layout = model.layout
    stats = reference_statistics(model, [images(8)], [2, 7])
    assert 7 in stats.outliers and 2 not in stats.outliers  # artifacts appear after block 5
    assert stats.outliers[7].samples.shape[0] == 8 * len(PLANTED)
    x = images(3, seed=5)
    plain = model.forward_intermediates(x, [7])[7].tokens
    with torch.no_grad(), model.edit(outputs=ablation_edits(layout, "outliers", kind, stats)):
        edited = model.forward_intermediates(x, [7])[7].tokens
    changed = (edited != plain).any(-1)  # (B, T)
    expected = torch.zeros_like(changed)
    expected[:, [layout.num_prefix + p for p in PLANTED]] = True
    assert torch.equal(changed, expected)
    want = torch.zeros(192) if kind == "zero" else stats.outliers[7].mean[0]
    torch.testing.assert_close(layout.patches(edited)[:, PLANTED], want.expand(3, len(PLANTED), 192))


def test_missing_targets_are_notes_not_crashes():
    bare = planted_vit(0)
    stats = reference_statistics(bare, [images(4)], [1, 2])
    assert stats.registers == {} and stats.outliers == {}
    assert "no register tokens" in missing_target("registers", stats, bare.layout, "valley")
    assert "no reference patch token above the valley threshold" in missing_target(
        "outliers", stats, bare.layout, "valley"
    )
    assert missing_target("cls", stats, bare.layout, "valley") is None
    with pytest.raises(ValueError, match="nothing to replace for target 'registers'"):
        ablation_edits(bare.layout, "registers", "mean", stats)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"ablate\.targets"):
        AblateSettings(targets=["patches"])
    with pytest.raises(ValueError, match=r"ablate\.metrics"):
        AblateSettings(metrics=["fid"])


# ---------------------------------------------------------------- the task end to end
def check_payload(out, payload: dict, targets: set[str]) -> dict:
    on_disk = json.loads((out / "ablate.json").read_text())
    assert on_disk["task"] == "ablate" and payload["result"]["rows"]
    result = on_disk["result"]
    assert {(r["target"], r["replacement"]) for r in result["rows"]} == {
        (t, k) for t in targets for k in ("zero", "mean", "noise", "shuffle")
    }
    for row in result["rows"]:
        assert set(row["change"]) == set(result["baseline"])
    assert (out / "ablate.png").stat().st_size > 0
    lines = EVALUATIONS["ablate"].summary(result)
    assert any(line.startswith("cls/mean") for line in lines)
    assert on_disk["settings"]["ablate"]["reference_images"] == result["reference"]["reference_images"]
    return result


@pytest.mark.slow
def test_task_on_an_official_layout_dinov2_file(tmp_path):
    checkpoint = tmp_path / "planted.pth"
    save_dinov2_checkpoint(planted_vit(4, patches=PLANTED, block=5), checkpoint)
    cfg = analyze_cfg(
        [
            "task=ablate",
            f"checkpoint={checkpoint}",
            "num_images=4",
            "ablate.reference_images=6",
            "ablate.layers=[6,7]",
            "ablate.metrics=[telemetry,knn]",
            "knn.ks=[1,5]",
            *TINY_DATA,
            "data.resolution=112",
            "data.synthetic_images=12",
        ]
    )
    path, payload = run_task(cfg, tmp_path / "out", torch.device("cpu"))
    assert path == tmp_path / "out" / "ablate.json"
    result = check_payload(tmp_path / "out", payload, {"registers", "cls", "outliers"})
    assert result["reference"]["outlier_tokens"] == {"6": 6 * len(PLANTED), "7": 6 * len(PLANTED)}
    base = result["baseline"]
    assert base["patch_outlier_fraction"] == pytest.approx(len(PLANTED) / 64)
    rows = {(r["target"], r["replacement"]): r for r in result["rows"]}
    # the planted outliers are written at block 5: replacing them at blocks 6-7 removes them from the last layer
    assert rows["outliers", "zero"]["numbers"]["patch_outlier_fraction"] == 0.0


@pytest.mark.slow
def test_task_on_a_vitreg_checkpoint_notes_what_it_skips(tmp_path, monkeypatch):
    from vitreg.models.config import VIT_SIZES

    monkeypatch.setitem(VIT_SIZES, "vitt", ASSET_VITT)  # the asset was written with vitt shrunk
    checkpoint = tmp_path / "run" / "last.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(ASSET_CHECKPOINT.read_bytes())
    cfg = analyze_cfg(
        [
            "task=ablate",
            f"checkpoint={checkpoint}",
            "num_images=4",
            "ablate.reference_images=8",
            "ablate.detector=fixed",
            "ablate.fixed_cutoff=1.0e6",  # nothing is an outlier: the target is skipped with a note
            "lost.generated_images=2",
            "knn.ks=[1,5]",
            *TINY_DATA,
        ]
    )
    path, payload = run_task(cfg, tmp_path / "out", torch.device("cpu"))
    assert (
        path == tmp_path / "out" / "ablate.json"
        and payload["source"] == "vitreg"
        and payload["num_register_tokens"] == 2
    )
    result = check_payload(tmp_path / "out", payload, {"registers", "cls"})
    assert result["blocks"] == [0, 1] and {"knn_top1", "lost_corloc", "patch_norm_p99"} <= set(result["baseline"])
    assert any("outliers: no reference patch token above the fixed threshold" in n for n in result["notes"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ablate.targets=[patches]", "ablate.targets"),
        ("ablate.replacements=[blur]", "ablate.replacements"),
        ("ablate.metrics=[]", "ablate.metrics"),
        ("ablate.layers=[]", "ablate.layers"),
    ],
)
def test_bad_task_settings_fail_at_start_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        analyze_cfg(["task=ablate", f"checkpoint={ASSET_CHECKPOINT}", override])

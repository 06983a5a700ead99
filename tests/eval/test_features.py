"""Probe features: final-norm CLS of the last blocks, the register-free patch mean, DINOv2's linear input,
and extraction from rank-split loaders back into source order."""

from __future__ import annotations

import pytest
import torch

from tests.telemetry.planted import IMG, planted_vit, probe_images
from vitreg.data.transforms import eval_transform
from vitreg.eval.data import eval_loader
from vitreg.eval.features import Features, backbone_features, extract_features, linear_input
from vitreg.models.vision_transformer import build_vit


def tiny_vit(registers: int = 2, depth: int = 4):
    torch.manual_seed(0)
    return build_vit("vitt", depth=depth, num_register_tokens=registers, img_size=28, patch_size=14).eval()


def test_patch_mean_excludes_registers():
    # registers made high-norm from block 1 on: they dominate any mean that includes them
    model = planted_vit(num_registers=4, registers=[0, 1, 2, 3], block=1, boost=50.0)
    x = (probe_images(2).float() / 255 - 0.45) / 0.225
    cls, patch_mean = backbone_features(model, x)
    with torch.no_grad():
        tokens = model.norm(model.forward_features(x)["x_prenorm"])  # [CLS, 4 registers, 64 patches]
    torch.testing.assert_close(patch_mean, tokens[:, 5:].mean(1), rtol=1e-5, atol=1e-5)
    with_registers = tokens[:, 1:].mean(1)
    assert (with_registers - patch_mean).norm(dim=1).min() > 0.1 * patch_mean.norm(dim=1).max()
    torch.testing.assert_close(cls[:, 0], tokens[:, 0], rtol=1e-5, atol=1e-5)
    assert tokens.shape[1] == 1 + 4 + (IMG // 14) ** 2


def test_cls_of_the_last_blocks_oldest_first():
    model = tiny_vit(depth=5)
    x = torch.randn(3, 3, 28, 28)
    cls, patch_mean = backbone_features(model, x, n_blocks=4)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, [1, 2, 3, 4], return_class_token=True, norm=True)
        final = model.forward_features(x)
    assert cls.shape == (3, 4, 192) and cls.dtype == torch.float32
    for j, (_, class_token) in enumerate(layers):
        torch.testing.assert_close(cls[:, j], class_token)
    torch.testing.assert_close(cls[:, -1], final["x_norm_clstoken"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patch_mean, final["x_norm_patchtokens"].mean(1), rtol=1e-5, atol=1e-6)
    assert not torch.equal(cls[:, 0], cls[:, 1])


def dinov2_linear_input(x_tokens_list, use_n_blocks, use_avgpool):
    """DINOv2's create_linear_input, written from its description: CLS of the last n blocks concatenated,
    then the last block's mean patch token."""
    last = x_tokens_list[-use_n_blocks:]
    out = torch.cat([class_token for _, class_token in last], dim=-1)
    if use_avgpool:
        out = torch.cat([out, last[-1][0].mean(dim=1)], dim=-1)
    return out.float()


@pytest.mark.parametrize(("n_blocks", "avgpool"), [(1, False), (1, True), (4, False), (4, True), (2, True)])
def test_linear_input_matches_dinov2(n_blocks, avgpool):
    model = tiny_vit(depth=4)
    x = torch.randn(2, 3, 28, 28)
    cls, patch_mean = backbone_features(model, x, n_blocks=4)
    with torch.no_grad():
        tokens = model.get_intermediate_layers(x, 4, return_class_token=True)
    got = linear_input(cls, patch_mean, n_blocks, avgpool)
    assert got.shape == (2, (n_blocks + avgpool) * 192)
    torch.testing.assert_close(got, dinov2_linear_input(tokens, n_blocks, avgpool), rtol=1e-5, atol=1e-6)


def test_linear_input_order_by_hand():
    cls = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 3)  # block j's CLS is all j
    patch_mean = torch.full((1, 3), 10.0)
    assert linear_input(cls, patch_mean, 2, True).tolist() == [[2, 2, 2, 3, 3, 3, 10, 10, 10]]
    assert linear_input(cls, patch_mean, 1, False).tolist() == [[3, 3, 3]]
    with pytest.raises(ValueError, match="n_blocks=5"):
        linear_input(cls, patch_mean, 5, False)


def test_extract_features_in_source_order_with_workers():
    model = tiny_vit()
    model.train()
    synthetic = {"num_images": 11, "image_size": 32, "num_classes": 3}
    reference = None
    for workers, batch in [(0, 11), (2, 3)]:
        loader = eval_loader(
            "synthetic", eval_transform(28), batch_size=batch, num_workers=workers, synthetic=synthetic
        )
        feats = extract_features(model, loader, n_blocks=2)
        assert model.training  # mode restored
        assert isinstance(feats, Features) and len(feats) == 11
        assert feats.indices.tolist() == list(range(11))
        assert feats.labels.tolist() == [i % 3 for i in range(11)]
        assert feats.cls.shape == (11, 2, 192) and feats.patch_mean.shape == (11, 192)
        assert sum(feats.skipped.values()) == 0
        local = extract_features(model, loader, n_blocks=2, gather=False)  # this rank's rows, sorted by index
        assert local.indices.tolist() == list(range(11)) and torch.equal(local.cls, feats.cls)
        if reference is None:
            reference = feats
        else:  # worker interleaving undone; same numbers (batch composition changes only float rounding)
            torch.testing.assert_close(feats.cls, reference.cls, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(feats.patch_mean, reference.patch_mean, rtol=1e-5, atol=1e-5)


def test_extract_features_from_plain_batches_and_in_bf16():
    model = tiny_vit()
    images, labels = torch.randn(5, 3, 28, 28), torch.tensor([4, 3, 2, 1, 0])
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    fp32 = extract_features(model, batches)
    assert fp32.labels.tolist() == [4, 3, 2, 1, 0] and fp32.indices.tolist() == [0, 1, 2, 3, 4]
    cls, _ = backbone_features(model, images)
    torch.testing.assert_close(fp32.cls, cls, rtol=1e-5, atol=1e-5)
    bf16 = extract_features(model, batches, autocast_dtype=torch.bfloat16)
    assert bf16.cls.dtype == torch.float32
    assert not torch.equal(bf16.cls, fp32.cls)  # autocast really ran
    torch.testing.assert_close(bf16.cls, fp32.cls, rtol=0.1, atol=0.1)

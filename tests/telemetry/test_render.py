import numpy as np
import pytest

from tests.telemetry.planted import IMG, planted_vit, probe_images
from vitreg.telemetry import render
from vitreg.telemetry.measure import measure


@pytest.fixture(scope="module")
def measured():
    probe = probe_images(4)
    model = planted_vit(4, patches=[0, 9, 27, 63], block=5)
    history = []
    for step in (0, 10, 20):
        record, maps = measure(model, probe, IMG)
        record.update(step=step, model="teacher")
        history.append(record)
    return probe, history, maps


def test_colourise_maps_the_range_onto_the_colour_table_and_nan_to_white():
    lut = render._lut("inferno")
    out = render.colourise(np.array([[0.0, 1.0], [0.5, np.nan]]))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], lut[0])
    np.testing.assert_array_equal(out[0, 1], lut[255])
    np.testing.assert_array_equal(out[1, 0], lut[128])
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])
    np.testing.assert_array_equal(render.colourise(np.full((2, 2), 3.0)), np.broadcast_to(lut[0], (2, 2, 3)))


def test_upsample_gives_one_block_per_cell_and_tile_leaves_gaps():
    grid = np.arange(6, dtype=np.uint8).reshape(2, 3, 1).repeat(3, axis=2)
    big = render.upsample(grid, (4, 6))
    np.testing.assert_array_equal(big[:, :, 0], np.kron(grid[:, :, 0], np.ones((2, 2), dtype=np.uint8)))
    tiles = render.tile([[big, big], [big]])
    assert tiles.shape == (2 * 4 + render.GAP, 2 * 6 + render.GAP, 3)
    assert (tiles[4 : 4 + render.GAP] == 255).all()  # the gap row
    assert (tiles[4 + render.GAP :, 6 + render.GAP :] == 255).all()  # a missing tile stays white


def test_emergence_image_has_a_cell_per_layer_and_step(measured):
    _, history, _ = measured
    image, caption = render.emergence_image(history)
    rows, cols = 13 * (-(-240 // 13)), 3 * 120
    assert image.shape == (rows, cols, 3)
    cell_h = rows // 13
    # layers 0..5 have no outliers (the darkest colour), layers 6.. the most (the brightest)
    lut = render._lut("magma")
    np.testing.assert_array_equal(image[0, 0], lut[0])
    np.testing.assert_array_equal(image[6 * cell_h, 0], lut[255])
    assert "rows: layer 0 (top) .. 12" in caption and "steps 0 .. 20" in caption


def test_attention_tiles_mark_outliers_white_and_show_every_register(measured):
    probe, _, maps = measured
    image, caption = render.attention_tiles(probe.numpy(), maps, tile_px=48)
    n = maps["norm"].shape[0]
    assert image.shape == (n * 48 + (n - 1) * render.GAP, 7 * 48 + 6 * render.GAP, 3)  # image, norm, CLS, 4 registers
    norm_tile = image[:48, 48 + render.GAP : 2 * 48 + render.GAP]
    assert (norm_tile[:6, :6] == 255).all()  # patch 0 is a planted outlier: white
    np.testing.assert_array_equal(image[:48, :48], render.upsample(probe[0].permute(1, 2, 0).numpy(), (48, 48)))
    assert "registers 0..3" in caption


def test_position_and_histogram_images(measured):
    _, history, _ = measured
    pos, _ = render.position_image(history[-1])
    assert pos.shape == (160, 160, 3)
    hist, caption = render.histogram_image(history[-1], "prenorm")
    assert hist.shape[0] >= 240 and hist.shape[1] >= 400 and "log(1 + count)" in caption


def test_callback_draws_both_media_styles(measured):
    from omegaconf import OmegaConf

    from vitreg.config import TelemetryConfig
    from vitreg.lit.telemetry import ArtifactTelemetry

    probe, history, maps = measured
    for style in ("tiles", "figures"):
        callback = ArtifactTelemetry.__new__(ArtifactTelemetry)
        callback.t = OmegaConf.structured(TelemetryConfig(media_style=style))
        pictures = callback._pictures(history[-1], maps, probe, history)
        assert set(pictures) == {"emergence", "attention_maps", "position_map", "norm_histograms"}
        for image, caption in pictures.values():
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and caption

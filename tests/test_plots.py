"""The one palette, overlay and PNG grid writer every picture goes through."""
import numpy as np
import pytest
from PIL import Image

from jaxboost import plots
from jaxboost.data import labels


def test_a_structure_has_one_colour_in_the_camus_and_sdm_label_sets():
    for camus_label in range(4):
        sdm_label = labels.CAMUS_TO_SDM[camus_label]
        if camus_label:  # CAMUS background splits into SDM outside-cone (black) and tissue (grey)
            np.testing.assert_array_equal(plots.CAMUS_PALETTE[camus_label], plots.SDM_PALETTE[sdm_label])
    assert len({tuple(c) for c in plots.SDM_PALETTE}) == 5


def test_overlay_tints_labelled_pixels_only():
    image = np.full((2, 2), 100, np.uint8)
    out = plots.overlay(image, np.array([[0, 1], [2, 3]]), alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(out[0, 1], [160, 80, 80])    # (100 + LV red (220, 60, 60)) / 2
    np.testing.assert_array_equal(out[1, 1], [85, 110, 170])   # (100 + LA blue (70, 120, 240)) / 2


def test_image_grid_writes_one_png_and_a_failure_leaves_the_old_one(tmp_path):
    path = tmp_path / "grid.png"
    gray, rgb = np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8)
    plots.image_grid(path, [[gray, rgb, "a prompt"], [gray]], [["a", "b", ""], ["c"]], title="t")
    assert Image.open(path).format == "PNG" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    before = path.read_bytes()
    with pytest.raises(TypeError):
        plots.image_grid(path, [[np.zeros((8, 8, 7))]])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["grid.png"]

"""Structure labels, the SDM 5-label map, and mask augmentation (the CAMUS labels; the SDM's 5 labels as echo_from_noise)."""
import numpy as np
import pytest
from scipy import ndimage

from jaxboost.data import augment, labels, phantom


def test_sdm_labels_with_cone_and_from_image():
    cone = phantom.sector_cone(40, 32)
    mask = np.zeros((40, 32), np.uint8)
    mask[10:20, 12:20], mask[20:24, 12:20], mask[24:30, 12:20] = 1, 2, 3
    mask[0, 0] = 1  # outside the cone: clipped to 0
    expected = np.where(cone == 1, 2, 0).astype(np.uint8)
    expected[10:20, 12:20], expected[20:24, 12:20], expected[24:30, 12:20] = 1, 3, 4
    np.testing.assert_array_equal(labels.sdm_labels(mask, cone), expected)
    # From an image: cavities are dark (0) inside the sector, yet the derived cone is solid.
    image = (cone * 120).astype(np.uint8)
    image[10:20, 12:20] = 0
    np.testing.assert_array_equal(labels.cone_from_image(image), cone)
    np.testing.assert_array_equal(labels.sdm_labels(mask, image, is_cone=False), expected)


def test_binary_mask_and_names():
    mask = np.array([[0, 1, 2, 3]], np.uint8)
    np.testing.assert_array_equal(labels.binary_mask(mask, "MYO"), [[0, 0, 1, 0]])
    np.testing.assert_array_equal(labels.binary_mask(mask, 3), [[0, 0, 0, 1]])
    assert labels.STRUCTURE_NAMES["LA"] == "Left atrium cavity" and labels.LABEL_OF["LV"] == 1


def test_sdm_labels_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        labels.sdm_labels(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))


def _mask():
    mask = np.zeros((64, 64), np.uint8)
    mask[15:40, 22:42], mask[12:15, 22:42], mask[40:52, 25:40] = 1, 2, 3
    return mask


def test_augment_is_deterministic_keeps_labels_and_moves_them():
    mask = _mask()
    a = augment.augment_mask(mask, np.random.default_rng(4))
    b = augment.augment_mask(mask, np.random.default_rng(4))
    c = augment.augment_mask(mask, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, mask)
    assert set(np.unique(a)) <= {0, 1, 2, 3} and a.dtype == np.uint8
    # Scale is 0.8-1.05: the LV area changes by at most ~(1.05^2) up, 0.8^2 down, plus elastic slack.
    ratio = (a == 1).sum() / (mask == 1).sum()
    assert 0.55 < ratio < 1.25


def test_augment_applies_one_draw_to_mask_and_cone():
    mask, cone = _mask(), phantom.sector_cone(64, 64)
    no_elastic = augment.AugmentConfig(elastic=False, rotation_deg=0, shear_deg=0, scale_range=(1, 1))
    m, c = augment.augment_mask(mask, np.random.default_rng(0), no_elastic, cone=cone)
    # Pure translation: the mask and the cone moved by the same offset.
    shift = np.argwhere(m == 1).min(0) - np.argwhere(mask == 1).min(0)
    assert np.abs(shift).max() <= 4
    np.testing.assert_array_equal(c[20:50, 20:44], np.roll(cone, tuple(shift), (0, 1))[20:50, 20:44])


def test_augment_batch_without_elastic_is_scipys_nearest_affine_transform():
    # The warp's affine part against scipy.ndimage.affine_transform (order 0 = nearest, outside -> 0) on the
    # same draw. Our coordinates are float32 and scipy's float64, so a coordinate within ~1e-5 of a half
    # rounds either way: a few boundary pixels (<1%) may differ, each to a label of scipy's 3x3 neighbourhood.
    maps = np.stack([_mask(), phantom.sector_cone(64, 64)], -1)
    cfg = augment.AugmentConfig(elastic=False)
    rngs = [np.random.default_rng(i) for i in range(6)]
    out = augment.augment_batch(np.stack([maps] * 6), rngs, cfg)
    for i in range(6):
        inverse, offset, _ = augment.draw_augmentation(np.random.default_rng(i), (64, 64), cfg)
        for m in range(2):
            want = ndimage.affine_transform(maps[..., m], inverse.astype(np.float64), offset.astype(np.float64),
                                            order=0, mode="constant", cval=0)
            differ = out[i, ..., m] != want
            assert differ.mean() < 0.01
            low, high = ndimage.minimum_filter(want, 3), ndimage.maximum_filter(want, 3)
            assert ((out[i, ..., m] >= low) & (out[i, ..., m] <= high))[differ].all()


def test_augment_batch_rows_do_not_depend_on_the_batch_and_match_augment_mask():
    mask, cone = _mask(), phantom.sector_cone(64, 64)
    maps = np.stack([np.stack([np.roll(mask, i, 0), cone], -1) for i in range(5)])
    batch = augment.augment_batch(maps, [np.random.default_rng([7, i]) for i in range(5)])
    for i in range(5):
        m, c = augment.augment_mask(np.roll(mask, i, 0), np.random.default_rng([7, i]), cone=cone)
        np.testing.assert_array_equal(batch[i, ..., 0], m)
        np.testing.assert_array_equal(batch[i, ..., 1], c)
    # The elastic field moves pixels beyond the affine map (it is on by default).
    affine = augment.augment_batch(maps[:1], [np.random.default_rng([7, 0])], augment.AugmentConfig(elastic=False))
    assert (affine[0] != batch[0]).any()

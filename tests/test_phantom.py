"""The echo phantom: CAMUS layout, labels, anatomy that differs by view/phase, reproducible bytes."""
import hashlib
import time

import numpy as np
import pytest

from jaxboost.data import camus, phantom

SMALL = (64, 48)


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt,suffixes", [("nii", [".nii.gz"]), ("mhd", [".mhd", ".raw"])])
def test_phantom_writes_camus_layout(tmp_path, fmt, suffixes):
    phantom.write_phantom(tmp_path, patients=4, seed=1, fmt=fmt, size=SMALL)
    assert sorted(p.name for p in (tmp_path / "training").iterdir()) == ["patient0001", "patient0002", "patient0003"]
    assert sorted(p.name for p in (tmp_path / "testing").iterdir()) == ["patient0004"]
    folder = tmp_path / "training" / "patient0002"
    expected = {"Info_2CH.cfg", "Info_4CH.cfg"} | {
        f"patient0002_{v}_{p}{gt}{s}" for v in ("2CH", "4CH") for p in ("ED", "ES") for gt in ("", "_gt")
        for s in suffixes}
    assert {p.name for p in folder.iterdir()} == expected
    cfg = camus.read_cfg(folder / "Info_4CH.cfg")
    assert set(cfg) == {"ED", "ES", "NbFrame", "Sex", "Age", "ImageQuality"} and 1 <= cfg["ES"] <= cfg["NbFrame"]
    mask = camus.read_image(folder / f"patient0002_2CH_ED_gt{suffixes[0]}")
    image = camus.read_image(folder / f"patient0002_2CH_ED{suffixes[0]}")
    assert mask.shape == image.shape == SMALL and image.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1, 2, 3}
    assert "not patient data" in (tmp_path / "PHANTOM.txt").read_text()


def test_phantom_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        phantom.write_phantom(tmp_path / name, patients=2, seed=seed, fmt="nii", size=SMALL)
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_phantom_anatomy_ed_larger_than_es_and_4ch_has_unlabelled_right_heart():
    rng = np.random.default_rng(0)
    anatomy = phantom._patient_anatomy(rng)
    h, w = 160, 128
    img_ed, mask_ed = phantom._draw_view(rng, anatomy, "2CH", "ED", "Good", h, w)
    _, mask_es = phantom._draw_view(rng, anatomy, "2CH", "ES", "Good", h, w)
    assert (mask_ed == 1).sum() > 1.2 * (mask_es == 1).sum()
    cone = phantom.sector_cone(h, w).astype(bool)
    assert img_ed[~cone].max() == 0
    # Myocardium is brighter than the LV cavity.
    assert img_ed[mask_ed == 2].mean() > 2 * img_ed[mask_ed == 1].mean()
    img_4ch, mask_4ch = phantom._draw_view(rng, anatomy, "4CH", "ED", "Good", h, w)
    left = np.zeros((h, w), bool)
    left[:, : w // 2] = True
    dark_unlabelled = lambda img, m: ((img < 60) & (m == 0) & cone & left).sum()
    assert dark_unlabelled(img_4ch, mask_4ch) > 3 * dark_unlabelled(img_ed, mask_ed) + 50


def test_phantom_quality_lowers_contrast():
    anatomy = phantom._patient_anatomy(np.random.default_rng(0))
    contrast = {}
    for quality in ("Good", "Poor"):
        image, mask = phantom._draw_view(np.random.default_rng(1), anatomy, "2CH", "ED", quality, 160, 128)
        contrast[quality] = image[mask == 2].mean() - image[mask == 1].mean()
    assert contrast["Good"] > 1.3 * contrast["Poor"]


def test_sector_cone_is_an_apical_fan():
    cone = phantom.sector_cone(100, 80)
    assert cone[0].sum() <= 2 and cone[90].sum() > 60
    np.testing.assert_array_equal(cone, cone[:, ::-1])


def test_phantom_ten_default_size_patients_under_ten_seconds(tmp_path):
    start = time.perf_counter()
    phantom.write_phantom(tmp_path, patients=10, seed=0)
    assert time.perf_counter() - start < 10
    assert len(camus.read_camus(tmp_path)) == 40


def test_phantom_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--patients"):
        phantom.write_phantom(tmp_path, patients=0)
    with pytest.raises(ValueError, match="--format"):
        phantom.write_phantom(tmp_path, patients=1, fmt="png")
    phantom.write_phantom(tmp_path / "p", patients=2, size=(32, 32))
    phantom.write_phantom(tmp_path / "p", patients=2, size=(32, 32))  # the same phantom again: fine
    with pytest.raises(ValueError, match=r"p: not empty and not this phantom"):
        phantom.write_phantom(tmp_path / "p", patients=3, size=(32, 32))


def test_phantom_anatomy_shows_sex_and_age():
    """The captions name sex and age, so the picture carries them: a woman's LV is smaller, an older
    heart has a thicker wall and a larger LA (same shape draws otherwise)."""
    areas = {}
    for sex, age in (("M", 30), ("F", 30), ("M", 85)):
        anatomy = phantom._patient_anatomy(np.random.default_rng(0), sex, age)
        _, mask = phantom._draw_view(np.random.default_rng(1), anatomy, "2CH", "ED", "Good", 160, 128)
        areas[sex, age] = {label: int((mask == label).sum()) for label in (1, 2, 3)}
    assert areas["F", 30][1] < 0.8 * areas["M", 30][1]
    assert areas["M", 85][2] > 1.3 * areas["M", 30][2] and areas["M", 85][3] > 1.3 * areas["M", 30][3]

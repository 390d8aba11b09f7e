"""CAMUS reader: both formats and layouts, patient split, and one clear error per kind of bad input."""
import gzip
import shutil
from collections import Counter

import numpy as np
import pytest

from jaxboost.data import camus, phantom

SMALL = (40, 32)


@pytest.fixture
def nii_phantom(tmp_path):
    return phantom.write_phantom(tmp_path / "nii", patients=3, seed=5, fmt="nii", size=SMALL)


def test_nii_and_mhd_read_back_identical_pixels(tmp_path):
    nii = phantom.write_phantom(tmp_path / "nii", patients=2, seed=7, fmt="nii", size=SMALL)
    mhd = phantom.write_phantom(tmp_path / "mhd", patients=2, seed=7, fmt="mhd", size=SMALL)
    recs_nii, recs_mhd = camus.read_camus(nii), camus.read_camus(mhd)
    assert [r.name for r in recs_nii] == [r.name for r in recs_mhd]
    assert recs_mhd[0].image_path.suffix == ".mhd" and recs_nii[0].image_path.name.endswith(".nii.gz")
    for a, b in zip(recs_nii, recs_mhd):
        (ia, ma), (ib, mb) = a.load(), b.load()
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
        assert ia.shape == SMALL


def test_reader_matches_what_was_drawn(tmp_path):
    """Orientation: the file holds exactly the [H, W] array the phantom drew (not transposed)."""
    import nibabel as nib
    import SimpleITK as sitk
    image = np.arange(40 * 32, dtype=np.uint32).reshape(40, 32).astype(np.uint8)
    for fmt in ("nii", "mhd"):
        path = phantom.write_image(tmp_path / f"x_{fmt}", image, fmt)[0]
        np.testing.assert_array_equal(camus.read_image(path), image)
        # Both files say width 32 (x) and height 40 (y), as ITK-written CAMUS files do, and ITK reads
        # the NIfTI we wrote with nibabel as the same [H, W] array.
        assert sitk.ReadImage(str(path)).GetSize()[:2] == (32, 40)
        np.testing.assert_array_equal(np.squeeze(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))), image)
    assert nib.load(str(tmp_path / "x_nii.nii.gz")).shape == (32, 40)


def test_split_counts_and_patients_in_one_split_only(tmp_path):
    root = phantom.write_phantom(tmp_path, patients=20, seed=0, fmt="nii", size=SMALL)
    records = camus.read_camus(root)
    # 20 patients: 2 testing (50/500 scaled); of 18 training, round(18*50/450)=2 validation.
    assert Counter(r.split for r in records) == {"train": 64, "val": 8, "test": 8}
    splits_of = {}
    for r in records:
        splits_of.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {p for p, s in splits_of.items() if s == {"val"}} == {"patient0001", "patient0002"}
    assert {p for p, s in splits_of.items() if s == {"test"}} == {"patient0019", "patient0020"}
    assert camus.num_val_patients(450) == 50


def test_flat_nifti_release_layout_splits_last_patients_to_test(tmp_path):
    root = phantom.write_phantom(tmp_path / "src", patients=10, seed=0, fmt="nii", size=SMALL)
    flat = tmp_path / "CAMUS_public" / "database_nifti"
    flat.mkdir(parents=True)
    for folder in sorted(root.glob("*/patient*")):
        shutil.move(str(folder), flat / folder.name)
    records = camus.read_camus(tmp_path / "CAMUS_public")
    assert {r.patient for r in records if r.split == "test"} == {"patient0010"}
    assert {r.patient for r in records if r.split == "val"} == {"patient0001"}
    # The 2023 release's official test list, when present, decides the test patients.
    split_dir = tmp_path / "CAMUS_public" / "database_split"
    split_dir.mkdir()
    (split_dir / "subgroup_testing.txt").write_text("patient0001\npatient0004\n")
    records = camus.read_camus(flat)
    assert {r.patient for r in records if r.split == "test"} == {"patient0001", "patient0004"}
    assert {r.patient for r in records if r.split == "val"} == {"patient0002"}
    (split_dir / "subgroup_testing.txt").write_text("patient0099\n")
    with pytest.raises(ValueError, match=r"subgroup_testing\.txt: lists patients not found.*patient0099"):
        camus.read_camus(flat)


def _first(root, stem_suffix):
    return next(root.glob(f"training/patient0001/patient0001_2CH_ED{stem_suffix}"))


def test_mask_label_outside_0_3_names_the_file(nii_phantom):
    path = _first(nii_phantom, "_gt.nii.gz")
    mask = camus.read_image(path)
    mask[0, 0] = 5
    phantom.write_image(path.with_name("patient0001_2CH_ED_gt"), mask, "nii")
    record = camus.read_camus(nii_phantom)[0]
    with pytest.raises(ValueError, match=r"patient0001_2CH_ED_gt\.nii\.gz.*labels.*\[5\]"):
        record.load()


def test_image_mask_shape_mismatch_names_the_file(nii_phantom):
    path = _first(nii_phantom, "_gt.nii.gz")
    phantom.write_image(path.with_name("patient0001_2CH_ED_gt"), np.zeros((10, 12), np.uint8), "nii")
    with pytest.raises(ValueError, match=r"patient0001_2CH_ED_gt\.nii\.gz: mask shape \(10, 12\)"):
        camus.read_camus(nii_phantom)[0].load()


def test_missing_cfg_names_the_file(nii_phantom):
    (nii_phantom / "training/patient0002/Info_4CH.cfg").unlink()
    with pytest.raises(FileNotFoundError, match=r"patient0002/Info_4CH\.cfg"):
        camus.read_camus(nii_phantom)


@pytest.mark.parametrize("text,problem", [
    ("ED: 1\nES: 9\nNbFrame: 20\nSex: F\nAge: old\nImageQuality: Good\n", "Age must be a number"),
    ("ED: 1\nES: 9\nNbFrame: 20\nSex: F\nImageQuality: Good\n", r"missing keys \['Age'\]"),
    ("ED: 1\nES: 9\nNbFrame: 20\nSex: X\nAge: 3\nImageQuality: Good\n", "Sex must be M or F"),
    ("ED 1\n", "expected 'key: value'"),
])
def test_unparsable_cfg_names_the_file_and_problem(nii_phantom, text, problem):
    (nii_phantom / "training/patient0001/Info_2CH.cfg").write_text(text)
    with pytest.raises(ValueError, match=r"patient0001/Info_2CH\.cfg.*" + problem):
        camus.read_camus(nii_phantom)


def test_corrupt_nifti_names_the_file(nii_phantom):
    path = _first(nii_phantom, ".nii.gz")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"patient0001_2CH_ED\.nii\.gz: cannot read image"):
        camus.read_camus(nii_phantom)[0].load()
    path.write_bytes(gzip.compress(b"not a nifti header"))
    with pytest.raises(ValueError, match=r"patient0001_2CH_ED\.nii\.gz: cannot read image"):
        camus.read_camus(nii_phantom)[0].load()


def test_corrupt_mhd_names_the_file(tmp_path):
    root = phantom.write_phantom(tmp_path, patients=1, seed=0, fmt="mhd", size=SMALL)
    raw = _first(root, ".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"patient0001_2CH_ED\.mhd: cannot read image"):
        camus.read_camus(root)[0].load()


def test_missing_image_and_empty_folder(nii_phantom, tmp_path):
    _first(nii_phantom, ".nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"patient0001_2CH_ED: missing image"):
        camus.read_camus(nii_phantom)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no patientXXXX folders"):
        camus.read_camus(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        camus.read_camus(tmp_path / "nowhere")

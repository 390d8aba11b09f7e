"""Read CAMUS (real or the phantom) and split it by patient (the CAMUS layout, Leclerc et al. 2019).

Layouts read:
  - DIR/training/patientXXXX/ + DIR/testing/patientXXXX/  (the mhd release; the phantom writes this)
  - DIR/[database_nifti/]patientXXXX/ all together (the 2023 nii release): test patients are those listed
    in database_split/subgroup_testing.txt (next to database_nifti) when that file exists; otherwise the
    last round(n * 50 / 500) patients (451-500 for the full set, the challenge's test patients).
Images: `patientXXXX_{2CH,4CH}_{ED,ES}.{nii.gz|mhd}` and `..._gt` masks (0 background, 1 LV, 2 MYO, 3 LA);
`Info_{2CH,4CH}.cfg` holds `key: value` lines (ED, ES, NbFrame, Sex, Age, ImageQuality).
Splits: testing patients -> "test"; of the training patients the first max(1, round(n * 50 / 450)) are
"val" (the first 50 of 450 in CAMUS), the rest "train"; a patient is in exactly one split.
Every problem raises one ValueError/FileNotFoundError naming the file and what is wrong.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

VIEWS = ("2CH", "4CH")
PHASES = ("ED", "ES")
SEXES = ("M", "F")
QUALITIES = ("Good", "Medium", "Poor")
MAX_AGE = 130
CFG_KEYS = ("ED", "ES", "NbFrame", "Sex", "Age", "ImageQuality")
_PATIENT_RE = re.compile(r"^patient\d{4}$")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One CAMUS image with its mask paths and the patient's metadata."""
    patient: str
    view: str
    phase: str
    image_path: Path
    mask_path: Path
    sex: str
    age: int
    quality: str
    split: str
    ed_frame: int
    es_frame: int
    num_frames: int

    @property
    def name(self) -> str:
        return f"{self.patient}_{self.view}_{self.phase}"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W], mask uint8 [H, W] labels 0-3), validated."""
        image = read_image(self.image_path)
        if image.size and np.all(image == image.flat[0]):  # NaN never equals itself: to_uint8 names those
            raise ValueError(f"{self.image_path}: every pixel is {image.flat[0].item()!r}: a blank or damaged export, "
                             "not an echo image")
        mask = read_image(self.mask_path)
        if image.shape != mask.shape:
            raise ValueError(f"{self.mask_path}: mask shape {mask.shape} does not match image shape "
                             f"{image.shape} of {self.image_path.name}")
        bad = np.setdiff1d(np.unique(mask), [0, 1, 2, 3])
        if bad.size:
            raise ValueError(f"{self.mask_path}: mask labels must be in {{0,1,2,3}}, found {bad.tolist()}")
        return to_uint8(image, self.image_path), mask.astype(np.uint8)


def to_uint8(image: np.ndarray, path) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{path}: image holds NaN or inf")
    if image.min() >= 0 and image.max() <= 255:
        return np.rint(image).astype(np.uint8)
    lo, hi = float(image.min()), float(image.max())
    return np.rint((image - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)


def _squeeze_2d(array: np.ndarray, path) -> np.ndarray:
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2D image, got shape {array.shape}")
    return array


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D .nii.gz/.nii (nibabel; stored x=column first, returned [H, W]) or .mhd (SimpleITK)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    name = path.name
    try:
        if name.endswith(".nii.gz") or name.endswith(".nii"):
            import nibabel as nib
            array = np.asarray(nib.load(str(path)).dataobj)
            array = _squeeze_2d(array, path).T  # NIfTI's first axis is x (columns)
        elif name.endswith(".mhd"):
            import SimpleITK as sitk
            array = _squeeze_2d(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), path)  # [1, H, W] -> [H, W]
        else:
            raise ValueError(f"{path}: unknown image format (expected .nii.gz, .nii or .mhd)")
    except ValueError:
        raise
    except Exception as e:  # nibabel/gzip/ITK raise many kinds for a damaged file
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(array)


def read_cfg(path: str | Path) -> dict:
    """Parse Info_XCH.cfg -> {ED, ES, NbFrame: int, Sex: 'M'|'F', Age: int, ImageQuality: str}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Info cfg not found")
    values = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if ":" not in line:
            raise ValueError(f"{path}:{number}: expected 'key: value', got {line!r}")
        key, value = line.split(":", 1)
        values[key.strip()] = value.strip()
    missing = [k for k in CFG_KEYS if k not in values]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    out = {}
    for key in ("ED", "ES", "NbFrame", "Age"):
        try:
            out[key] = int(float(values[key]))
        except ValueError:
            raise ValueError(f"{path}: {key} must be a number, got {values[key]!r}") from None
    if not 0 <= out["Age"] <= MAX_AGE:  # the prompts spell it out: "a minus-five-year-old" helps nobody
        raise ValueError(f"{path}: Age must be between 0 and {MAX_AGE}, got {values['Age']!r}")
    out["Sex"] = values["Sex"].upper()[:1]
    if out["Sex"] not in SEXES:
        raise ValueError(f"{path}: Sex must be M or F, got {values['Sex']!r}")
    quality = values["ImageQuality"].capitalize()
    if quality not in QUALITIES:
        raise ValueError(f"{path}: ImageQuality must be one of {QUALITIES}, got {values['ImageQuality']!r}")
    out["ImageQuality"] = quality
    return out


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in (".nii.gz", ".mhd", ".nii"):
        path = folder / (stem + suffix)
        if path.is_file():
            return path
    raise FileNotFoundError(f"{folder / stem}: missing image (.nii.gz or .mhd)")


def _patient_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _PATIENT_RE.match(p.name))


def discover(root: str | Path) -> dict[str, list[Path]]:
    """{"training": [patient dirs], "testing": [patient dirs]} for either CAMUS layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CAMUS folder not found")
    if (root / "training").is_dir() or (root / "testing").is_dir():
        found = {s: _patient_dirs(root / s) if (root / s).is_dir() else [] for s in ("training", "testing")}
    else:
        flat = root / "database_nifti" if (root / "database_nifti").is_dir() else root
        patients = _patient_dirs(flat)
        split_file = flat.parent / "database_split" / "subgroup_testing.txt"
        if split_file.is_file():
            listed = {line.strip() for line in split_file.read_text().splitlines() if line.strip()}
            unknown = sorted(listed - {p.name for p in patients})
            if unknown:
                raise ValueError(f"{split_file}: lists patients not found in {flat}: {unknown[:5]}")
            found = {"training": [p for p in patients if p.name not in listed],
                     "testing": [p for p in patients if p.name in listed]}
        else:
            n_test = 0 if len(patients) < 2 else max(1, round(len(patients) * 50 / 500))
            found = {"training": patients[: len(patients) - n_test], "testing": patients[len(patients) - n_test:]}
    if not found["training"] and not found["testing"]:
        raise ValueError(f"{root}: no patientXXXX folders found (expected training/, testing/ or patient folders)")
    return found


def num_val_patients(num_training: int) -> int:
    """First 50 of 450 training patients are validation; scaled down, at least 1, never all of them."""
    if num_training < 2:
        return 0
    return min(num_training - 1, max(1, round(num_training * 50 / 450)))


def read_patient(folder: Path, split: str) -> list[ImageRecord]:
    """The 4 images of one patient (2CH/4CH x ED/ES) with metadata; checks every file exists and cfgs parse."""
    patient = folder.name
    records = []
    for view in VIEWS:
        cfg = read_cfg(folder / f"Info_{view}.cfg")
        for phase in PHASES:
            stem = f"{patient}_{view}_{phase}"
            if split == "test" and not any((folder / f"{stem}_gt{x}").is_file() for x in (".nii.gz", ".mhd", ".nii")):
                raise FileNotFoundError(f"{folder / (stem + '_gt')}: missing test mask (the 2017 mhd release ships "
                                        "none for its testing/ patients; use the 2023 nii release)")
            records.append(ImageRecord(
                patient=patient, view=view, phase=phase, image_path=_find_image(folder, stem),
                mask_path=_find_image(folder, stem + "_gt"), sex=cfg["Sex"], age=cfg["Age"],
                quality=cfg["ImageQuality"], split=split, ed_frame=cfg["ED"], es_frame=cfg["ES"],
                num_frames=cfg["NbFrame"]))
    return records


def read_camus(root: str | Path) -> list[ImageRecord]:
    """All image records of a CAMUS folder, patient-split, sorted by (split order, patient, view, phase).

    Only metadata and paths are read here (fast); `record.load()` reads and validates the pixels.
    """
    found = discover(root)
    n_val = num_val_patients(len(found["training"]))
    records = []
    for index, folder in enumerate(found["training"]):
        records += read_patient(folder, "val" if index < n_val else "train")
    for folder in found["testing"]:
        records += read_patient(folder, "test")
    patients = {}
    for r in records:
        if patients.setdefault(r.patient, r.split) != r.split:
            raise ValueError(f"{root}: {r.patient} appears in both {patients[r.patient]} and {r.split}")
    return records


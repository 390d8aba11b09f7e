"""A procedural echo phantom in the CAMUS layout (Leclerc et al. 2019): synthetic pictures, never real patient data.

`jaxboost phantom --out DIR --patients N --seed S [--format nii|mhd] [--size H W]` writes
    DIR/training/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}[_gt].{nii.gz|mhd+raw}, Info_{2CH,4CH}.cfg
    DIR/testing/patientXXXX/...        (the last ~10% of patients, as CAMUS's 50 of 500)
Each image is an apical view: a sector cone from the apex at the top, Rayleigh-like speckle, a bright
myocardium U around a dark LV cavity, the LA below it; the 4CH view adds right-heart chambers as
unlabelled tissue; ED cavities are larger than ES; image quality sets noise, contrast and haze; sex sets the LV size and
age the wall thickness, LA size and EF (as reference ranges do, exaggerated to show at low resolution).
Same seed, same bytes: every patient draws from its own rng(seed, patient) and files carry no timestamps
(gzip mtime 0). Arrays are stored like CAMUS: NIfTI in (x=column, y=row) order, MetaImage as W x H x 1.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from jaxboost.jsonio import write_atomic

VIEWS = ("2CH", "4CH")
PHASES = ("ED", "ES")
QUALITIES = ("Good", "Medium", "Poor")
DEFAULT_SIZE = (320, 256)  # (H, W); CAMUS images are taller than wide
MAX_SIZE = 4096  # CAMUS images are at most ~1200 px a side; NIfTI/MetaImage headers hold up to 32767
CONE_HALF_ANGLE = np.deg2rad(38.0)
PHANTOM_NOTE = ("jaxboost echo phantom: procedurally drawn pictures in the CAMUS layout, not patient data.\n"
                "patients: {n}\nseed: {seed}\nformat: {fmt}\nsize: {h} {w}\n")


def sector_cone(h: int, w: int, half_angle: float = CONE_HALF_ANGLE, depth: float = 0.97) -> np.ndarray:
    """Apical scan sector [h, w] uint8 {0,1}: apex at the top centre, radius depth * h."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = rows + 0.5, cols + 0.5 - w / 2
    radius, angle = np.hypot(dy, dx), np.arctan2(dx, dy)
    return ((np.abs(angle) <= half_angle) & (radius <= depth * h)).astype(np.uint8)


def _ellipse(rows, cols, cy, cx, ry, rx, tilt):
    """Boolean ellipse centred (cy, cx) with radii (ry along the tilted long axis, rx across)."""
    c, s = np.cos(tilt), np.sin(tilt)
    y, x = rows - cy, cols - cx
    u, v = c * y + s * x, -s * y + c * x
    return (u / ry) ** 2 + (v / rx) ** 2 <= 1.0


def _patient_anatomy(rng: np.random.Generator, sex: str = "M", age: int = 55) -> dict:
    """Per-patient shape parameters (fractions of H/W), shared by both views and phases.

    Sex and age shape the heart as they do in echo reference ranges, exaggerated so a small image shows them
    (the captions name both, and a caption whose words the image cannot show is unlearnable for matching):
    women have a smaller LV cavity; with age the myocardium thickens, the LA grows and the EF drops a little.
    """
    years = (np.clip(age, 20, 90) - 20) / 70.0          # 0 at 20, 1 at 90
    size = 1.0 if sex == "M" else 0.86
    return dict(
        lv_len=size * rng.uniform(0.27, 0.31), lv_wid=size * rng.uniform(0.16, 0.18),
        wall=(0.028 + 0.03 * years) * rng.uniform(0.92, 1.08),
        la_len=(0.10 + 0.05 * years) * rng.uniform(0.95, 1.05), la_wid=(0.12 + 0.05 * years) * rng.uniform(0.95, 1.05),
        ef=rng.uniform(0.45, 0.68) - 0.1 * years, tilt=rng.uniform(-0.12, 0.12))


def _draw_view(rng, anatomy, view, phase, quality, h, w):
    """One view/phase: (image uint8 [h, w], mask uint8 [h, w] with 0-3)."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    cone = sector_cone(h, w).astype(bool)
    # ES shrinks the cavity by the ejection fraction (volume ~ length * width^2) and thickens the wall.
    shrink = 1.0 if phase == "ED" else (1.0 - anatomy["ef"]) ** (1 / 3)
    lv_ry = anatomy["lv_len"] * h * (1.0 if phase == "ED" else 0.85 + 0.15 * shrink)
    lv_rx = anatomy["lv_wid"] * w * shrink
    wall = anatomy["wall"] * w * (1.0 if phase == "ED" else 1.3)
    shift = 0.09 * w if view == "4CH" else 0.0  # 4CH: the right heart takes the left of the sector
    tilt = anatomy["tilt"] + (0.05 if view == "4CH" else 0.0)
    base_y = 0.62 * h  # mitral annulus row
    lv_cy, lv_cx = base_y - lv_ry * 0.85, w / 2 + shift
    below_base = rows > base_y
    lv = _ellipse(rows, cols, lv_cy, lv_cx, lv_ry, lv_rx, tilt) & ~below_base
    myo = _ellipse(rows, cols, lv_cy, lv_cx, lv_ry + wall, lv_rx + wall, tilt) & ~below_base & ~lv
    la_ry = anatomy["la_len"] * h * (1.0 if phase == "ED" else 1.15)  # LA fills while the LV empties
    la = _ellipse(rows, cols, base_y + la_ry * 0.95, lv_cx + 0.02 * w, la_ry, anatomy["la_wid"] * w, -tilt)
    la &= below_base & ~myo & ~lv
    mask = np.zeros((h, w), np.uint8)
    mask[la], mask[myo], mask[lv] = 3, 2, 1
    mask[~cone] = 0

    # Echogenicity: tissue mid-grey, myocardium bright, blood dark; the right heart (4CH) is unlabelled.
    echo = np.full((h, w), 0.35)
    echo[myo] = 0.85
    blood = lv | la
    if view == "4CH":
        rv = _ellipse(rows, cols, lv_cy + 0.04 * h, w / 2 - 0.16 * w, lv_ry * 0.85, lv_rx * 0.7, tilt)
        ra = _ellipse(rows, cols, base_y + la_ry, w / 2 - 0.14 * w, la_ry * 0.9, anatomy["la_wid"] * w * 0.8, -tilt)
        right = (rv & ~below_base | ra & below_base) & ~(lv | myo | la)
        septum = ndimage.binary_dilation(right, iterations=3) & ~right & ~(lv | la)
        echo[septum] = np.maximum(echo[septum], 0.7)
        blood |= right
    echo[blood] = 0.04
    echo = ndimage.gaussian_filter(echo, 1.5)

    level = QUALITIES.index(quality)  # 0 good, 1 medium, 2 poor
    # Rayleigh speckle: magnitude of a smoothed complex Gaussian field, laterally elongated like real PSFs.
    field = rng.standard_normal((2, h, w))
    field = ndimage.gaussian_filter(field, sigma=(0, 0.8, 1.6))
    speckle = np.hypot(field[0], field[1])
    speckle /= speckle.mean()
    depth = np.hypot(rows, cols - w / 2) / h
    attenuation = np.exp(-(0.6 + 0.4 * level) * depth)
    contrast = (1.0, 0.7, 0.45)[level]
    haze = (0.02, 0.08, 0.16)[level] * (1 + 0.5 * rng.random())  # clutter filling the cavities
    noise = (0.02, 0.06, 0.12)[level] * np.abs(rng.standard_normal((h, w)))
    signal = (haze + contrast * echo) * speckle * attenuation + noise
    image = np.log1p(8.0 * signal) / np.log1p(8.0 * 1.6)  # log compression, as scanners display
    image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    image[~cone] = 0
    return image, mask


def _nifti_bytes(array: np.ndarray) -> bytes:
    """[H, W] uint8 -> .nii.gz bytes, stored (x=column, y=row) like CAMUS, gzip mtime 0 for reproducibility."""
    import nibabel as nib
    image = nib.Nifti1Image(np.ascontiguousarray(array.T), affine=np.eye(4))
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def write_image(path_stem: Path, array: np.ndarray, fmt: str) -> list[Path]:
    """Write [H, W] uint8 as path_stem.nii.gz or path_stem.mhd + .raw (MetaImage, W x H x 1 like CAMUS)."""
    h, w = array.shape
    if fmt == "nii":
        path = path_stem.with_name(path_stem.name + ".nii.gz")
        write_atomic(path, _nifti_bytes(array))
        return [path]
    if fmt == "mhd":
        raw = path_stem.with_name(path_stem.name + ".raw")
        mhd = path_stem.with_name(path_stem.name + ".mhd")
        write_atomic(raw, np.ascontiguousarray(array, np.uint8).tobytes())
        header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                  f"CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\n"
                  f"CenterOfRotation = 0 0 0\nElementSpacing = 0.308 0.154 1\nDimSize = {w} {h} 1\n"
                  f"ElementType = MET_UCHAR\nElementDataFile = {raw.name}\n")
        write_atomic(mhd, header.encode())
        return [mhd, raw]
    raise ValueError(f"unknown image format {fmt!r}: use 'nii' or 'mhd'")


def num_test_patients(n: int) -> int:
    """CAMUS keeps 50 of 500 patients for testing; scaled down, at least one when n >= 2."""
    return 0 if n < 2 else max(1, round(n * 50 / 500))


def write_patient(folder: Path, number: int, seed: int, fmt: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng([seed, number])
    name = f"patient{number:04d}"
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    sex = "M" if rng.random() < 0.5 else "F"
    age = int(rng.integers(20, 91))
    quality = QUALITIES[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
    anatomy = _patient_anatomy(rng, sex, age)
    h, w = size
    for view in VIEWS:
        frames = int(rng.integers(14, 27))
        es = int(rng.integers(int(frames * 0.45), int(frames * 0.8)))
        for phase in PHASES:
            image, mask = _draw_view(rng, anatomy, view, phase, quality, h, w)
            write_image(folder / f"{name}_{view}_{phase}", image, fmt)
            write_image(folder / f"{name}_{view}_{phase}_gt", mask, fmt)
        cfg = f"ED: 1\nES: {es}\nNbFrame: {frames}\nSex: {sex}\nAge: {age}\nImageQuality: {quality}\n"
        write_atomic(folder / f"Info_{view}.cfg", cfg.encode())


def write_phantom(out: str | os.PathLike, patients: int, seed: int = 0, fmt: str = "nii",
                  size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """Write the phantom; returns the output folder. Patients 1..n-t go to training/, the rest to testing/."""
    if patients < 1:
        raise ValueError(f"--patients must be >= 1, got {patients}")
    if fmt not in ("nii", "mhd"):
        raise ValueError(f"--format must be 'nii' or 'mhd', got {fmt!r}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0 (numpy seeds are non-negative), got {seed}")
    if min(size) < 32 or max(size) > MAX_SIZE:
        raise ValueError(f"--size must be between 32 and {MAX_SIZE} pixels each, got {tuple(size)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, not a folder")
    note = PHANTOM_NOTE.format(n=patients, seed=seed, fmt=fmt, h=size[0], w=size[1])
    if out.is_dir() and any(out.iterdir()):
        marker = out / "PHANTOM.txt"
        if not marker.is_file() or marker.read_text() != note:  # rewriting the same phantom is fine
            raise ValueError(f"{out}: not empty and not this phantom (other files or other settings); "
                             "use a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "PHANTOM.txt", note.encode())
    n_test = num_test_patients(patients)
    for number in range(1, patients + 1):
        split_dir = "testing" if number > patients - n_test else "training"
        write_patient(out / split_dir, number, seed, fmt, tuple(size))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True,
                        help="output folder (CAMUS layout: training/ and testing/ patientXXXX folders); "
                             "new or empty, or an earlier run of the same settings")
    parser.add_argument("--patients", type=int, default=10,
                        help="number of patients (4 images each); about 1 in 10 goes to testing/")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    parser.add_argument("--format", choices=("nii", "mhd"), default="nii",
                        help="nii: .nii.gz as the 2023 CAMUS release; mhd: .mhd + .raw as the 2017 release")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=list(DEFAULT_SIZE),
                        help=f"image height and width in pixels (32 to {MAX_SIZE} each)")


def main(args) -> int:
    out = write_phantom(args.out, args.patients, args.seed, args.format, tuple(args.size))
    print(f"wrote a {args.patients}-patient echo phantom (synthetic, not patient data) to {out}")
    return 0

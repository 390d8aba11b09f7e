"""Evaluation metrics for binary segmentation, computed in numpy at the source image resolution.

A prediction (logits at the model's resolution) is resized to the ground truth's size with torch-exact
bilinear interpolation of the probabilities, thresholded, and scored: Dice and IoU x100 per mask, and the
symmetric Hausdorff distance between the mask boundaries (pixels, or mm given a spacing).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from jaxboost.models.resize import torch_bilinear_matrix


def check_binary_mask(mask, name: str = "mask") -> np.ndarray:
    """-> bool array; ValueError (naming `name`) if the mask holds values other than 0 and 1."""
    mask = np.asarray(mask)
    values = np.unique(mask)
    if not np.all(np.isin(values, (0, 1))):
        raise ValueError(f"{name} must be binary (0/1) for one structure, found values {values[:10].tolist()}")
    return mask.astype(bool)


@functools.lru_cache(maxsize=32)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Built once per size pair (a Python loop over the output rows; every scored mask of a split has the same
    sizes): read-only, so no caller can change the cached copy."""
    m = torch_bilinear_matrix(in_size, out_size).astype(np.float64)
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=1)
def _openblas_threads():
    """(get, set) of the thread count of numpy's bundled OpenBLAS (numpy.libs/libscipy_openblas*), or None
    where numpy links another BLAS."""
    libs = sorted((Path(np.__file__).resolve().parent.parent / "numpy.libs").glob("libscipy_openblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for suffix in ("64_", "_64_", ""):
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    return None


@contextlib.contextmanager
def one_blas_thread():
    """numpy's OpenBLAS on one thread inside: a mask's resize ([H, h] @ [h, w] @ [w, W], float64) is too small
    to share, and with a thread per core OpenBLAS spends its time waking and spinning them (64 -> 320x256 px
    on 2 loaded cores: 25-35 ms a mask with two threads, 1.4-6 ms with one). Not always the same bits as
    with two threads: over 300 random resizes (32-128 px to 100-700 px) 221 moved by at most 2.2e-16 (one
    float64 ulp at 0.5-1), and no pixel crossed the threshold; the demo's workers already score on one."""
    threads = _openblas_threads()
    before = threads[0]() if threads else 1
    if before > 1:
        threads[1](1)
    try:
        yield
    finally:
        if before > 1:
            threads[1](before)


def probabilities_at(logits, shape: tuple[int, int]) -> np.ndarray:
    """sigmoid(logits [h, w]) bilinearly resized (torch, align_corners=False) to `shape` -> [H, W]."""
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    if probs.shape == tuple(shape):
        return probs
    mh, mw = _bilinear_matrix(probs.shape[0], shape[0]), _bilinear_matrix(probs.shape[1], shape[1])
    with one_blas_thread():
        return mh @ probs @ mw.T


def dice_iou(pred, gt) -> tuple[float, float]:
    """Dice and IoU x100 of two binary masks; both empty counts as a perfect 100."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    inter, total, union = np.sum(pred & gt), pred.sum() + gt.sum(), np.sum(pred | gt)
    if union == 0:
        return 100.0, 100.0
    return float(200.0 * inter / total), float(100.0 * inter / union)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask & ~ndimage.binary_erosion(mask))


def hausdorff(pred, gt, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """Symmetric Hausdorff distance between mask boundaries; NaN if either mask is empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        return float("nan")
    a, b = _boundary(pred) * np.asarray(spacing), _boundary(gt) * np.asarray(spacing)
    return float(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]))


def score_mask(logits, gt, threshold: float = 0.5, spacing=(1.0, 1.0), name: str = "mask",
               with_hausdorff: bool = True) -> dict:
    """logits [h, w] at model resolution, gt [H, W] binary at source resolution -> dice, iou (, hausdorff)."""
    gt = check_binary_mask(gt, name)
    pred = probabilities_at(logits, gt.shape) > threshold
    dice, iou = dice_iou(pred, gt)
    return {"dice": dice, "iou": iou, **({"hausdorff": hausdorff(pred, gt, spacing)} if with_hausdorff else {})}

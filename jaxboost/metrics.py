"""Evaluation metrics for binary segmentation, computed in numpy at the source image resolution.

A prediction (logits at the model's resolution) is resized to the ground truth's size with torch-exact
bilinear interpolation of the probabilities, thresholded, and scored: Dice and IoU x100 per mask, and the
symmetric Hausdorff distance between the mask boundaries (pixels, or mm given a spacing).
"""
from __future__ import annotations

import functools

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


def probabilities_at(logits, shape: tuple[int, int]) -> np.ndarray:
    """sigmoid(logits [h, w]) bilinearly resized (torch, align_corners=False) to `shape` -> [H, W]."""
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    if probs.shape == tuple(shape):
        return probs
    mh, mw = _bilinear_matrix(probs.shape[0], shape[0]), _bilinear_matrix(probs.shape[1], shape[1])
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

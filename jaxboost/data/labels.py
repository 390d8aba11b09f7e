"""CAMUS structure labels, binary masks per structure, and the SDM's 5-label map (the CAMUS layout, Leclerc et al. 2019).

CAMUS masks: 0 background, 1 LV cavity, 2 myocardium, 3 left atrium.
SDM labels (echo_from_noise): 0 outside the scan cone, 1 LV, 2 tissue inside the cone, 3 myocardium, 4 LA.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

STRUCTURES = ("LV", "MYO", "LA")
LABEL_OF = {"LV": 1, "MYO": 2, "LA": 3}
STRUCTURE_OF = {v: k for k, v in LABEL_OF.items()}
STRUCTURE_NAMES = {"LV": "Left ventricular cavity", "MYO": "Myocardium", "LA": "Left atrium cavity"}
NUM_CAMUS_LABELS = 4
NUM_SDM_LABELS = 5

# CAMUS label -> SDM label for pixels inside the cone (0 background becomes 2 "tissue inside the cone").
CAMUS_TO_SDM = np.array([2, 1, 3, 4], np.uint8)


def binary_mask(mask: np.ndarray, structure: str | int) -> np.ndarray:
    """[H, W] multi-class CAMUS mask -> [H, W] uint8 {0, 1} mask of one structure (name or label id)."""
    label = LABEL_OF[structure] if isinstance(structure, str) else int(structure)
    return (np.asarray(mask) == label).astype(np.uint8)


def cone_from_image(image: np.ndarray, threshold: int = 0) -> np.ndarray:
    """Scan-sector support of an echo image: pixels > threshold, holes filled and gaps closed.

    Dark cavities inside the sector are zero-valued in places; filling holes of the largest connected
    support and a small closing recovers the sector as one solid region. [H, W] -> [H, W] uint8 {0, 1}.
    """
    support = np.asarray(image) > threshold
    if not support.any():
        return np.zeros(support.shape, np.uint8)
    pad = 6  # closing erodes from the border; pad so a sector touching the image edge stays whole
    support = np.pad(support, pad)
    support = ndimage.binary_closing(support, structure=np.ones((5, 5)), iterations=2)[pad:-pad, pad:-pad]
    components, count = ndimage.label(support)
    if count > 1:
        sizes = ndimage.sum(support, components, index=np.arange(1, count + 1))
        support = components == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(support).astype(np.uint8)


def sdm_labels(mask: np.ndarray, image_or_cone: np.ndarray, *, is_cone: bool | None = None) -> np.ndarray:
    """CAMUS mask [H, W] (0-3) + image or cone [H, W] -> SDM 5-label map [H, W] uint8.

    The cone is taken as given when `is_cone` is True (or when the array only holds 0/1 and `is_cone`
    is None); otherwise it is derived from the image's non-zero support. Structures are clipped to the
    cone, as the public SDM code does.
    """
    mask = np.asarray(mask)
    other = np.asarray(image_or_cone)
    if mask.shape != other.shape:
        raise ValueError(f"sdm_labels: mask shape {mask.shape} != image/cone shape {other.shape}")
    if is_cone is None:
        is_cone = other.dtype == bool or set(np.unique(other).tolist()) <= {0, 1}
    cone = other.astype(bool) if is_cone else cone_from_image(other).astype(bool)
    if mask.min() < 0 or mask.max() >= NUM_CAMUS_LABELS:
        raise ValueError(f"sdm_labels: mask labels must be in 0-3, got max {mask.max()}")
    return np.where(cone, CAMUS_TO_SDM[mask.astype(np.intp)], 0).astype(np.uint8)

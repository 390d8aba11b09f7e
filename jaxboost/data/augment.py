"""Label-map augmentation for building the synthetic corpus (SPEC A3): random affine + elastic deformation.

The original echo_from_noise corpus augments each real mask 5x with an affine transform (rotation +-5 deg,
translation 5%, scale 0.8-1.05, shear 5 deg) and an elastic deformation. Label maps are resampled with
nearest neighbour so labels stay labels. The same geometric draw is applied to a mask and its cone
(`augment_label_maps`), and the draw is a pure function of the numpy rng.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 5.0
    translate_frac: float = 0.05
    scale_range: tuple[float, float] = (0.8, 1.05)
    shear_deg: float = 5.0
    elastic_alpha: float = 0.03    # displacement magnitude, fraction of the image size
    elastic_sigma: float = 0.06    # smoothness of the displacement field, fraction of the image size
    elastic: bool = True


def _affine_matrix(rng: np.random.Generator, shape: tuple[int, int], cfg: AugmentConfig):
    """Output->input (row, col) map as (matrix, offset) for ndimage.map_coordinates, about the centre."""
    h, w = shape
    angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    shear = np.deg2rad(rng.uniform(-cfg.shear_deg, cfg.shear_deg))
    scale = rng.uniform(*cfg.scale_range)
    shift = rng.uniform(-cfg.translate_frac, cfg.translate_frac, size=2) * np.array([h, w])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shearing = np.array([[1.0, 0.0], [np.tan(shear), 1.0]])
    forward = scale * rotation @ shearing  # input -> output about the centre
    inverse = np.linalg.inv(forward)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - inverse @ (centre + shift)
    return inverse, offset


def _sample_coordinates(rng: np.random.Generator, shape: tuple[int, int], cfg: AugmentConfig) -> np.ndarray:
    """[2, H, W] input coordinates for every output pixel: affine, then a smooth random displacement."""
    h, w = shape
    inverse, offset = _affine_matrix(rng, shape, cfg)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    grid = np.stack([rows, cols])
    coords = np.einsum("ij,jhw->ihw", inverse, grid) + offset[:, None, None]
    if cfg.elastic:
        sigma = cfg.elastic_sigma * max(h, w)
        noise = rng.uniform(-1, 1, size=(2, h, w))
        field = np.stack([ndimage.gaussian_filter(n, sigma, mode="constant") for n in noise])
        field *= cfg.elastic_alpha * max(h, w) / max(np.abs(field).max(), 1e-12)
        coords = coords + field
    return coords


def augment_label_maps(maps: list[np.ndarray], rng: np.random.Generator,
                       cfg: AugmentConfig = AugmentConfig()) -> list[np.ndarray]:
    """Apply one random affine + elastic draw to several [H, W] label maps (nearest; outside -> 0)."""
    shape = np.asarray(maps[0]).shape
    for m in maps:
        if np.asarray(m).shape != shape:
            raise ValueError(f"augment_label_maps: shapes differ {np.asarray(m).shape} vs {shape}")
    coords = _sample_coordinates(rng, shape, cfg)
    return [ndimage.map_coordinates(np.asarray(m), coords, order=0, mode="constant", cval=0).astype(np.asarray(m).dtype)
            for m in maps]


def augment_mask(mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                 cone: np.ndarray | None = None):
    """[S, S] uint8 multi-class mask (and optionally its cone) -> augmented copy (mask, or (mask, cone))."""
    if cone is None:
        return augment_label_maps([mask], rng, cfg)[0]
    mask_out, cone_out = augment_label_maps([mask, cone], rng, cfg)
    return mask_out, cone_out

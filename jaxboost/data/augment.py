"""Label-map augmentation for building the synthetic corpus (SPEC A3): random affine + elastic deformation.

The original echo_from_noise corpus augments each real mask 5x with an affine transform (rotation +-5 deg,
translation 5%, scale 0.8-1.05, shear 5 deg) and an elastic deformation. Label maps are resampled with
nearest neighbour so labels stay labels. The same geometric draw is applied to a mask and its cone
(`augment_label_maps`), and the draw is a pure function of the numpy rng.

Cost: the elastic field is smooth at the scale sigma (15 px at 256 px), so it is drawn and smoothed on a
grid of sigma/2 spacing and interpolated up bilinearly (two small matrix products) instead of smoothing a
full-resolution noise image; the nearest-neighbour resampling is one integer gather per map. ~1 ms per
256 px mask and cone on one core, against ~60 ms for full-resolution gaussian filtering + map_coordinates.
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


def _upsample_linear(coarse: np.ndarray, axis: int, fine: int, step: int) -> np.ndarray:
    """Values on a grid of spacing `step` along `axis` -> `fine` pixels, linearly interpolated (elementwise,
    not a matrix product: a threaded BLAS on a busy host takes 100x longer for these small products)."""
    position = np.arange(fine) / step
    left = np.floor(position).astype(np.intp)
    shape = [1] * coarse.ndim
    shape[axis] = fine
    frac = (position - left).astype(np.float32).reshape(shape)
    return np.take(coarse, left, axis) * (1 - frac) + np.take(coarse, left + 1, axis) * frac


def _elastic_field(rng: np.random.Generator, shape: tuple[int, int], cfg: AugmentConfig) -> np.ndarray:
    """[2, H, W] smooth random displacement, its largest component elastic_alpha * size pixels."""
    h, w = shape
    sigma = cfg.elastic_sigma * max(h, w)
    step = max(1, int(sigma // 2))  # a gaussian of std sigma carries nothing finer than ~sigma/2
    noise = rng.uniform(-1, 1, size=(2, (h - 1) // step + 2, (w - 1) // step + 2))
    coarse = np.stack([ndimage.gaussian_filter(n, sigma / step, mode="constant") for n in noise]).astype(np.float32)
    field = _upsample_linear(_upsample_linear(coarse, 1, h, step), 2, w, step)
    return field * (cfg.elastic_alpha * max(h, w) / max(np.abs(field).max(), 1e-12))


def _sample_coordinates(rng: np.random.Generator, shape: tuple[int, int], cfg: AugmentConfig) -> np.ndarray:
    """[2, H, W] float32 input coordinates for every output pixel: affine, then a smooth random displacement."""
    h, w = shape
    inverse, offset = (a.astype(np.float32) for a in _affine_matrix(rng, shape, cfg))  # float64 scalars upcast
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    coords = np.stack([inverse[i, 0] * rows + inverse[i, 1] * cols + offset[i] for i in (0, 1)])
    if cfg.elastic:
        coords += _elastic_field(rng, shape, cfg)
    return coords


def augment_label_maps(maps: list[np.ndarray], rng: np.random.Generator,
                       cfg: AugmentConfig = AugmentConfig()) -> list[np.ndarray]:
    """Apply one random affine + elastic draw to several [H, W] label maps (nearest; outside -> 0)."""
    shape = np.asarray(maps[0]).shape
    for m in maps:
        if np.asarray(m).shape != shape:
            raise ValueError(f"augment_label_maps: shapes differ {np.asarray(m).shape} vs {shape}")
    h, w = shape
    coords = np.rint(_sample_coordinates(rng, shape, cfg))
    # One flat gather: pixel (r, c) of the input is index r * w + c; outside points read a zero pad at index h * w.
    inside = (coords[0] >= 0) & (coords[0] <= h - 1) & (coords[1] >= 0) & (coords[1] <= w - 1)
    flat = np.where(inside, coords[0] * w + coords[1], h * w).astype(np.int32)
    return [np.append(np.asarray(m).reshape(-1), np.zeros(1, np.asarray(m).dtype))[flat] for m in maps]


def augment_mask(mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                 cone: np.ndarray | None = None):
    """[S, S] uint8 multi-class mask (and optionally its cone) -> augmented copy (mask, or (mask, cone))."""
    if cone is None:
        return augment_label_maps([mask], rng, cfg)[0]
    mask_out, cone_out = augment_label_maps([mask, cone], rng, cfg)
    return mask_out, cone_out

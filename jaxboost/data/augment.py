"""Label-map augmentation for building the synthetic corpus (echo_from_noise augments each real mask 5x): random affine + elastic deformation.

The original echo_from_noise corpus augments each real mask 5x with an affine transform (rotation +-5 deg,
translation 5%, scale 0.8-1.05, shear 5 deg) and an elastic deformation. Label maps are resampled with
nearest neighbour so labels stay labels. The same geometric draw is applied to a mask and its cone
(`augment_label_maps`), and the draw is a pure function of the numpy rng.

Cost: the random draw (affine parameters, and noise smoothed on a grid of sigma/2 spacing: the field is
smooth at the scale sigma, 15 px at 256 px) is small and made on the host from the numpy rng; the warp
(bilinear upsampling of the field, coordinates, nearest resampling as one gather of all maps) is one jitted
call over a batch of draws (`augment_batch`), so `jaxboost synth` augments a whole sampler call's masks at
once. It runs on XLA's CPU backend: fused, outside the interpreter lock, the same pixels on every host, and
never queued behind a sampler call on the accelerator (which would make the next call wait for it). ~0.5-2 ms
per 256 px mask and cone on a busy 2-core CPU, against ~5 ms for the same arithmetic in numpy and ~60 ms for
full-resolution gaussian filtering + map_coordinates.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
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


def _upsample_linear(coarse: jax.Array, axis: int, fine: int, step: int) -> jax.Array:
    """Values on a grid of spacing `step` along `axis` -> `fine` pixels, linearly interpolated: pixel i lies
    between grid points i // step and i // step + 1. Built from repeats and slices (XLA on a CPU runs a gather
    ~2x slower than this)."""
    n = coarse.shape[axis]
    below, above = (jax.lax.slice_in_dim(jnp.repeat(jax.lax.slice_in_dim(coarse, lo, lo + n - 1, axis=axis),
                                                    step, axis=axis), 0, fine, axis=axis) for lo in (0, 1))
    position = np.arange(fine) / step
    shape = [1] * coarse.ndim
    shape[axis] = fine
    frac = (position - np.floor(position)).astype(np.float32).reshape(shape)
    return below * (1 - frac) + above * frac


def _grid_step(shape: tuple[int, int], cfg: AugmentConfig) -> tuple[float, int]:
    sigma = cfg.elastic_sigma * max(shape)
    return sigma, max(1, int(sigma // 2))  # a gaussian of std sigma carries nothing finer than ~sigma/2


def draw_augmentation(rng: np.random.Generator, shape: tuple[int, int], cfg: AugmentConfig = AugmentConfig()):
    """One random draw (cheap, on the host): the output->input affine map (inverse [2, 2], offset [2], float32)
    and the smoothed elastic noise on the coarse grid [2, gh, gw] (zeros without elastic)."""
    inverse, offset, coarse = draw_augmentations([rng], shape, cfg)
    return inverse[0], offset[0], coarse[0]


def draw_augmentations(rngs, shape: tuple[int, int], cfg: AugmentConfig = AugmentConfig()):
    """Draws of several rngs, one each: inverse [B, 2, 2], offset [B, 2], coarse noise [B, 2, gh, gw]. Each
    rng's numbers are drawn in the order of one draw; the noise of all is smoothed in one filter call (the
    filter runs along the grid axes only: the same values as one call per field)."""
    h, w = shape
    sigma, step = _grid_step(shape, cfg)
    grid = (2, (h - 1) // step + 2, (w - 1) // step + 2)
    affine, noise = [], []
    for rng in rngs:
        affine.append(_affine_matrix(rng, shape, cfg))
        noise.append(rng.uniform(-1, 1, size=grid) if cfg.elastic else np.zeros(grid))
    inverse = np.stack([a[0] for a in affine]).astype(np.float32)
    offset = np.stack([a[1] for a in affine]).astype(np.float32)
    noise = np.stack(noise)
    if cfg.elastic:
        noise = ndimage.gaussian_filter(noise, (0, 0, sigma / step, sigma / step), mode="constant")
    return inverse, offset, noise.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("step", "alpha_px"))
def warp_label_maps(maps, inverse, offset, coarse, *, step: int, alpha_px: float):
    """maps [B, H, W, M] (M maps per draw) under B draws -> [B, H, W, M]: nearest resampling (outside -> 0)
    at the affine coordinates plus the elastic field (the coarse noise upsampled bilinearly and scaled so its
    largest component is alpha_px pixels). Jitted: a few fused passes on the device, not ~20 numpy passes
    and one gather per map on the host."""
    b, h, w, m = maps.shape
    field = _upsample_linear(_upsample_linear(coarse, 2, h, step), 3, w, step)       # [B, 2, H, W]
    peak = jnp.maximum(jnp.abs(field).max(axis=(1, 2, 3), keepdims=True), 1e-12)
    rows = jnp.arange(h, dtype=jnp.float32)[:, None]
    cols = jnp.arange(w, dtype=jnp.float32)[None, :]
    affine = jnp.stack([inverse[:, i, 0, None, None] * rows + inverse[:, i, 1, None, None] * cols
                        + offset[:, i, None, None] for i in (0, 1)], 1)           # [B, 2, H, W]
    coords = jnp.rint(affine + field * (alpha_px / peak))
    inside = (coords[:, 0] >= 0) & (coords[:, 0] <= h - 1) & (coords[:, 1] >= 0) & (coords[:, 1] <= w - 1)
    # One gather of all M maps: pixel (r, c) is row r * w + c; outside points read a zero row at h * w.
    flat = jnp.where(inside, coords[:, 0] * w + coords[:, 1], h * w).astype(jnp.int32).reshape(b, h * w, 1)
    padded = jnp.concatenate([maps.reshape(b, h * w, m), jnp.zeros((b, 1, m), maps.dtype)], axis=1)
    return jnp.take_along_axis(padded, flat, axis=1).reshape(b, h, w, m)


def augment_batch(maps: np.ndarray, rngs, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """[B, H, W, M] label maps, one rng per row -> [B, H, W, M]: row b's M maps under one draw of rngs[b]
    (the same result as augment_label_maps with that rng, whatever B is)."""
    maps = np.asarray(maps)
    shape = maps.shape[1:3]
    draws = draw_augmentations(rngs, shape, cfg)
    maps, inverse, offset, coarse = jax.device_put((maps, *draws), jax.local_devices(backend="cpu")[0])
    return np.asarray(warp_label_maps(maps, inverse, offset, coarse, step=_grid_step(shape, cfg)[1],
                                      alpha_px=float(cfg.elastic_alpha * max(shape))))


def augment_label_maps(maps: list[np.ndarray], rng: np.random.Generator,
                       cfg: AugmentConfig = AugmentConfig()) -> list[np.ndarray]:
    """Apply one random affine + elastic draw to several [H, W] label maps (nearest; outside -> 0)."""
    shape = np.asarray(maps[0]).shape
    for m in maps:
        if np.asarray(m).shape != shape:
            raise ValueError(f"augment_label_maps: shapes differ {np.asarray(m).shape} vs {shape}")
    dtype = np.result_type(*[np.asarray(m).dtype for m in maps])
    out = augment_batch(np.stack([np.asarray(m, dtype) for m in maps], -1)[None], [rng], cfg)[0]
    return [out[..., i].astype(np.asarray(m).dtype) for i, m in enumerate(maps)]


def augment_mask(mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                 cone: np.ndarray | None = None):
    """[S, S] uint8 multi-class mask (and optionally its cone) -> augmented copy (mask, or (mask, cone))."""
    if cone is None:
        return augment_label_maps([mask], rng, cfg)[0]
    mask_out, cone_out = augment_label_maps([mask, cone], rng, cfg)
    return mask_out, cone_out

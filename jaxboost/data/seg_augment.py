"""Anatomy-preserving augmentation of segmentation batches, on device (inside the jitted step).

Per example: a small random affine (rotation, isotropic scale, translation; no flip: an apical view
mirrored puts the left heart on the right) applied to the image (bilinear) and to its mask (the same
sampling grid, bilinear then thresholded at 1/2), then intensity changes of the image only (gamma, contrast,
brightness and multiplicative speckle-like noise; echo intensity varies with gain and probe contact while the
anatomy stays). This is the geometric + intensity family of nnU-Net's default augmentation (Isensee et al.
2021: rotation, scaling, gamma, brightness, contrast, noise), at small magnitudes.

Magnitudes come from `config.data.augment` (AUGMENT_FIELDS, each >= 0; all 0 = off); the keys from the
step's rng, so the same seed gives the same batches and a resumed run continues bit-identically.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# field -> (what it bounds, the largest value accepted)
AUGMENT_FIELDS = {
    "rotate_deg": ("rotation, uniform in [-r, r] degrees", 45.0),
    "scale": ("zoom factor, uniform in [1 - s, 1 + s]", 0.5),
    "translate": ("shift per axis, uniform in [-t, t] x image size", 0.5),
    "gamma": ("image ** exp(u), u uniform in [-g, g]", 2.0),
    "contrast": ("(image - its mean) x uniform in [1 - c, 1 + c]", 1.0),
    "brightness": ("image + uniform in [-b, b]", 1.0),
    "noise": ("image x (1 + n x standard normal), speckle-like", 1.0),
}
OFF = {k: 0.0 for k in AUGMENT_FIELDS}
# The demo's magnitudes (configs/clipseg.py and cris.py, demo variant): an affine within the echo phantom's own
# spread between patients (tilt +-0.12 rad, cavity sizes +-5-8%: data/phantom.py) and intensity changes like
# its image qualities' haze and noise; set before any run, not tuned.
PHANTOM = dict(rotate_deg=8.0, scale=0.1, translate=0.04, gamma=0.25, contrast=0.2, brightness=0.05, noise=0.1)


def magnitudes(augment) -> dict:
    """config.data.augment (a dict or ConfigDict; None or empty: off) -> {field: float}, every field checked:
    an unknown field, a non-number or a value out of range is one ValueError naming the field."""
    given = dict(augment or {})
    out = dict(OFF)
    for name, value in given.items():
        if name not in AUGMENT_FIELDS:
            raise ValueError(f"config.data.augment.{name}: unknown field (known: {', '.join(AUGMENT_FIELDS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config.data.augment.{name}: expected a number, got {value!r}")
        limit = AUGMENT_FIELDS[name][1]
        if not 0.0 <= float(value) <= limit:
            raise ValueError(f"config.data.augment.{name}={value}: must be in [0, {limit}] "
                             f"({AUGMENT_FIELDS[name][0]})")
        out[name] = float(value)
    return out


def enabled(m: dict) -> bool:
    return any(v > 0 for v in m.values())


def _sample_coordinates(rng, size: int, m: dict):
    """One example's output pixel -> input pixel map [2, S, S]: x_in = c + A^-1 (x_out - c - t), A = s R."""
    k_rot, k_scale, k_shift = jax.random.split(rng, 3)
    angle = jnp.deg2rad(m["rotate_deg"]) * jax.random.uniform(k_rot, (), minval=-1.0, maxval=1.0)
    scale = 1.0 + m["scale"] * jax.random.uniform(k_scale, (), minval=-1.0, maxval=1.0)
    shift = m["translate"] * size * jax.random.uniform(k_shift, (2,), minval=-1.0, maxval=1.0)
    centre = (size - 1) / 2.0
    grid = jnp.stack(jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32),
                                  indexing="ij"))  # [2 (row, col), S, S]
    d = grid - centre - shift[:, None, None]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rows = (cos * d[0] + sin * d[1]) / scale + centre   # the inverse rotation, then the inverse zoom
    cols = (-sin * d[0] + cos * d[1]) / scale + centre
    return jnp.stack([rows, cols])


def random_affine(rng, image, mask, m: dict):
    """image float [B, S, S], mask float binary [B, S, S] -> both through one random affine per example
    (bilinear; outside the image: 0, the echo's black background; the mask re-binarised at 1/2)."""
    size = image.shape[1]
    coords = jax.vmap(lambda k: _sample_coordinates(k, size, m))(jax.random.split(rng, image.shape[0]))
    warp = jax.vmap(lambda x, c: jax.scipy.ndimage.map_coordinates(x, [c[0], c[1]], order=1, mode="constant",
                                                                   cval=0.0))
    moved = warp(mask.astype(jnp.float32), coords)
    return warp(image, coords).astype(image.dtype), (moved >= 0.5).astype(mask.dtype)


def random_intensity(rng, image, m: dict):
    """image float [B, S, S] in [0, 1] -> gamma, contrast, brightness, speckle-like noise; clipped to [0, 1]."""
    b = image.shape[0]
    k_gamma, k_contrast, k_bright, k_noise = jax.random.split(rng, 4)
    u = lambda k, r: r * jax.random.uniform(k, (b, 1, 1), minval=-1.0, maxval=1.0)  # noqa: E731
    x = image
    if m["gamma"] > 0:
        x = jnp.power(jnp.clip(x, 0.0, 1.0), jnp.exp(u(k_gamma, m["gamma"])))
    if m["contrast"] > 0:
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * (1.0 + u(k_contrast, m["contrast"])) + mean
    if m["brightness"] > 0:
        x = x + u(k_bright, m["brightness"])
    if m["noise"] > 0:
        x = x * (1.0 + m["noise"] * jax.random.normal(k_noise, x.shape, x.dtype))
    return jnp.clip(x, 0.0, 1.0).astype(image.dtype)


def augment_batch(rng, image, mask, augment):
    """(image [B, S, S] in [0, 1], binary mask [B, S, S]) -> the augmented pair; `augment` as `magnitudes`
    takes it. Off (every magnitude 0): the inputs, untouched."""
    m = magnitudes(augment)
    k_affine, k_intensity = jax.random.split(rng)
    if any(m[k] > 0 for k in ("rotate_deg", "scale", "translate")):
        image, mask = random_affine(k_affine, image, mask, m)
    if any(m[k] > 0 for k in ("gamma", "contrast", "brightness", "noise")):
        image = random_intensity(k_intensity, image, m)
    return image, mask

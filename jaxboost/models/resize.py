"""Resizes that match PyTorch's `F.interpolate`, for parity with models trained and run in torch.

`jax.image.resize("bicubic")` uses Keys' a=-0.5 and antialiasing; torch uses a=-0.75 without antialias
and clamps border taps. Resizing is linear, so it is a pair of constant matrices applied to the grid.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int, align_corners: bool = False) -> np.ndarray:
    """[out, in] matrix M with M @ v == F.interpolate(v, out_size, mode='bicubic') along one axis."""
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        if align_corners:
            src = i * (in_size - 1) / max(out_size - 1, 1)
        else:
            src = (i + 0.5) * in_size / out_size - 0.5
        f = int(np.floor(src))
        t = src - f
        for k in range(-1, 3):
            idx = min(max(f + k, 0), in_size - 1)
            m[i, idx] += _cubic(np.array(t - k))
    return m.astype(np.float32)


def torch_bilinear_matrix(in_size: int, out_size: int, align_corners: bool = False) -> np.ndarray:
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        if align_corners:
            src = i * (in_size - 1) / max(out_size - 1, 1)
        else:
            src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        f = min(int(np.floor(src)), in_size - 1)
        t = src - f
        m[i, f] += 1 - t
        m[i, min(f + 1, in_size - 1)] += t
    return m.astype(np.float32)


def resize_posemb_grid(posemb, old_hw: tuple[int, int], new_hw: tuple[int, int]):
    """posemb [old_h*old_w, D] -> [new_h*new_w, D] with torch bicubic (align_corners=False)."""
    d = posemb.shape[-1]
    grid = posemb.reshape(old_hw[0], old_hw[1], d)
    mh = jnp.asarray(torch_bicubic_matrix(old_hw[0], new_hw[0]))
    mw = jnp.asarray(torch_bicubic_matrix(old_hw[1], new_hw[1]))
    grid = jnp.einsum("ph,hwd->pwd", mh, grid)
    grid = jnp.einsum("qw,pwd->pqd", mw, grid)
    return grid.reshape(new_hw[0] * new_hw[1], d)


def resize_nhwc(x, size: tuple[int, int], mode: str = "bilinear", align_corners: bool = False):
    """x [B, H, W, C] -> [B, h, w, C] matching torch `F.interpolate(mode=...)` (bilinear|bicubic)."""
    make = torch_bilinear_matrix if mode == "bilinear" else torch_bicubic_matrix
    mh = jnp.asarray(make(x.shape[1], size[0], align_corners), x.dtype)
    mw = jnp.asarray(make(x.shape[2], size[1], align_corners), x.dtype)
    x = jnp.einsum("ph,bhwc->bpwc", mh, x)
    return jnp.einsum("qw,bpwc->bpqc", mw, x)


def resize_nearest(labels, size):
    """labels [B, H, W, ...] -> [B, h, w, ...] as torch F.interpolate(mode='nearest'): source index
    floor(dst * in / out)."""
    (h_in, w_in), (h, w) = labels.shape[1:3], size
    if h_in % h == 0 and w_in % w == 0:  # the U-Net's case: a strided slice, no gather
        return labels[:, :: h_in // h, :: w_in // w]
    rows = np.floor(np.arange(h) * (h_in / h)).astype(np.int32)
    cols = np.floor(np.arange(w) * (w_in / w)).astype(np.int32)
    return labels[:, rows][:, :, cols]

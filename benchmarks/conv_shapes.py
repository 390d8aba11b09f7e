"""One convolution at a time: forward, data gradient and filter gradient of each conv form in
`layers.CONV_IMPLS` against PyTorch's (oneDNN) conv2d and convolution_backward, same shapes, same process.
Says which part of which convolution a whole-step gap comes from, and which form to take for it.

  python -m benchmarks.conv_shapes [--model cris|sdm|sdm_quick] [--iters 2]

Shapes are the heaviest convolutions of each model's step (input [B, H, W, C], kernel k x k, C -> O, stride),
ms per call, min of `--iters` after one warm-up. JAX forms: "xla" (lax.conv_general_dilated: YNNPACK on
this XLA:CPU), "matmul" (im2col: one dot of the k*k shifted views), "mfg" (filter gradient only,
`matmul_filter_grad`'s: one dot of the input with the output gradient's k*k shifted views when unstrided, k*k
tap dots when strided), "winograd" / "winograd4" (F(2x2, 3x3) / F(4x4, 3x3), unstrided 3x3 only: 16 / 36
batched dots in all three parts).
--layouts also times the Winograd product [16, tiles, C] x [16, C, O] laid out three ways (XLA:CPU's dot
speed depends on which axis is the batch): points-first dot_general, tiles-first einsum, 16 separate dots.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxboost.models import layers

# (B, H, W, C, O, k, stride, how many in one step): the heaviest convolutions of each step (by forward FLOPs
# x count), read from each step's jaxpr: CRIS at 416 px b4, speed_sdm's quick model (32 px b4, SPADE's
# 128-wide convs lead) and configs/sdm.py:full at 256 px b1.
SHAPES = {
    "cris": [(4, 104, 104, 512, 256, 3, 1, 1), (4, 26, 26, 512, 512, 3, 1, 4), (4, 52, 52, 512, 512, 3, 1, 1),
             (4, 26, 26, 1024, 512, 3, 1, 1), (4, 52, 52, 512, 256, 3, 1, 1), (4, 26, 26, 256, 256, 3, 1, 5),
             (4, 104, 104, 128, 128, 3, 1, 1), (4, 104, 104, 64, 64, 3, 1, 3), (4, 26, 26, 1024, 256, 1, 1, 5)],
    "sdm_quick": [(4, 32, 32, 128, 64, 3, 1, 4), (4, 16, 16, 128, 64, 3, 1, 15), (4, 32, 32, 128, 96, 3, 1, 2),
                  (4, 32, 32, 128, 32, 3, 1, 4), (4, 32, 32, 64, 64, 3, 1, 2), (4, 16, 16, 64, 64, 3, 1, 7)],
    "sdm": [(1, 256, 256, 256, 256, 3, 1, 9), (1, 256, 256, 128, 512, 3, 1, 6), (1, 256, 256, 512, 256, 3, 1, 3),
            (1, 256, 256, 128, 256, 3, 1, 8), (1, 128, 128, 256, 256, 3, 1, 9), (1, 64, 64, 512, 512, 3, 1, 8)],
}
# The same full SDM at speed_sdm.FULL_CPU_SIZE (128 px, the size its CPU case times): every level at half the side.
SHAPES["sdm_128"] = [(b, h // 2, w // 2, c, o, k, s, n) for b, h, w, c, o, k, s, n in SHAPES["sdm"]]


def _best_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def jax_times(shape, iters: int, skip=()) -> dict[str, float]:
    """ms of forward / data grad / filter grad for each JAX form, but the columns named in `skip`."""
    b, h, w, c, o, k, s, _ = shape
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c), jnp.float32)
    conv = lambda name: (lambda x, kern: layers.CONV_IMPLS.get(name)(
        x, kern, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    g = jnp.ones(jax.eval_shape(conv("xla"), x, kern).shape, jnp.float32)
    out = {}
    winograd = k == 3 and s == 1
    for name in ("xla", "matmul") + (("winograd", "winograd4") if winograd else ()):
        f = conv(name)
        parts = {"fwd": (jax.jit(f), (x, kern)),
                 "data-grad": (jax.jit(lambda x, kern, g: jax.vjp(lambda x: f(x, kern), x)[1](g)), (x, kern, g)),
                 "filter-grad": (jax.jit(lambda x, kern, g: jax.vjp(lambda w: f(x, w), kern)[1](g)), (x, kern, g))}
        for part, (fn, fn_args) in parts.items():
            if f"{part} {name}" not in skip:
                out[f"{part} {name}"] = _best_ms(fn, *fn_args, iters=iters)
    if k > 1 and "filter-grad mfg" not in skip:
        taps = lambda x, kern, g: layers._conv_matmul_filter_grad_bwd((s, s), pad, None, None, (x, kern), g)[1]
        out["filter-grad mfg"] = _best_ms(jax.jit(taps), x, kern, g, iters=iters)
    return out


def layout_times(shape, iters: int) -> dict[str, float]:
    """ms of the Winograd product of this shape in three layouts."""
    b, h, w, c, o, *_ = shape
    n = b * (-(-h // 2)) * (-(-w // 2))
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.standard_normal((16, n, c)), jnp.float32)
    u = jnp.asarray(rng.standard_normal((16, c, o)), jnp.float32)
    forms = {"points-first dot_general": lambda v, u: jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))),
             "tiles-first einsum npc,pco->npo": lambda v, u: jnp.einsum("npc,pco->npo", v.transpose(1, 0, 2), u),
             "16 separate dots": lambda v, u: jnp.stack([v[p] @ u[p] for p in range(16)])}
    return {name: _best_ms(jax.jit(f), v, u, iters=iters) for name, f in forms.items()}


def torch_times(shape, iters: int) -> dict[str, float]:
    import torch
    b, h, w, c, o, k, s, _ = shape
    x = torch.randn(b, c, h, w)
    kern = torch.randn(o, c, k, k) / (k * k * c) ** 0.5
    y = torch.nn.functional.conv2d(x, kern, stride=s, padding=k // 2)
    g = torch.ones_like(y)

    def best(fn):
        fn()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3
    bwd = lambda mask: torch.ops.aten.convolution_backward(g, x, kern, None, [s, s], [k // 2, k // 2], [1, 1], False,
                                                           [0, 0], 1, mask)
    with torch.no_grad():
        return {"fwd torch": best(lambda: torch.nn.functional.conv2d(x, kern, stride=s, padding=k // 2)),
                "data-grad torch": best(lambda: bwd([True, False, False])),
                "filter-grad torch": best(lambda: bwd([False, True, False]))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SHAPES), default="cris")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--top", type=int, default=0, help="only the first N shapes (0: all)")
    p.add_argument("--layouts", action="store_true", help="also time the Winograd product's layouts")
    p.add_argument("--skip", default="", help="comma-separated columns not to time, e.g. 'filter-grad xla'")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(os.cpu_count())  # as the speed cases run torch: every core, like XLA:CPU
    cols = [f"{part} {form}" for part, forms in (("fwd", ("xla", "matmul", "winograd", "winograd4", "torch")),
                                                 ("data-grad", ("xla", "matmul", "winograd", "winograd4", "torch")),
                                                 ("filter-grad", ("xla", "matmul", "mfg", "winograd", "winograd4",
                                                                  "torch")))
            for form in forms]
    print("| shape (B,H,W,C->O,k,s) x n | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for shape in SHAPES[args.model][:args.top or None]:
        t = {**jax_times(shape, args.iters, args.skip.split(",")), **torch_times(shape, args.iters)}
        b, h, w, c, o, k, s, n = shape
        print(f"| {b},{h},{w},{c}->{o},{k},{s} x{n} | " + " | ".join(f"{t[c]:.0f}" if c in t else "-" for c in cols)
              + " |", flush=True)
        if args.layouts and k == 3 and s == 1:
            print(f"|   product layouts: " + ", ".join(f"{name} {ms:.0f}" for name, ms in
                                                      layout_times(shape, args.iters).items()) + " |", flush=True)


if __name__ == "__main__":
    main()

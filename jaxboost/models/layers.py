"""Transformer building blocks shared by CLIP, CLIPSeg, CRIS, BERT and MUMC.

Parameter names follow the roles (`query`, `key`, `value`, `out`, `fc1`, `fc2`) so that converters map
PyTorch state dicts by rule. Shapes: tokens are [B, L, D]; masks are boolean [B, 1|H, Lq, Lk], True = attend.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxboost.registry import Registry

Dtype = jnp.dtype


def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf GELU, as torch.nn.GELU() and BERT
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


# ----------------------------------------------------------------------------------------- remat

# Activation checkpointing policies by name (`model.remat_policy`): what a rematerialised block keeps for the
# backward pass. "full" keeps only the block's inputs; the dots policies keep matmul outputs (the expensive
# part to recompute) and recompute the cheap elementwise work; "offload_dots_with_no_batch_dims" moves those
# to pinned host memory (GPU/TPU). "none" is no remat.
REMAT_POLICIES = Registry("remat policy")
REMAT_POLICIES.register("full")(jax.checkpoint_policies.nothing_saveable)
REMAT_POLICIES.register("dots_saveable")(jax.checkpoint_policies.dots_saveable)
REMAT_POLICIES.register("dots_with_no_batch_dims_saveable")(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
REMAT_POLICIES.register("offload_dots_with_no_batch_dims")(
    jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"))


def remat_policy_name(policy: str | bool | None) -> str:
    """True -> "full", False/None/"" -> "none" (the boolean `remat` fields), names pass through."""
    if policy is True:
        return "full"
    if policy in (False, None, "", "none"):
        return "none"
    return str(policy)


def remat(module_cls, policy: str | bool | None, static_argnums: tuple[int, ...] = ()):
    """`module_cls` wrapped in `nn.remat` with the named policy, or unchanged for "none".

    static_argnums count `self` as 0 (flax's convention): the Python flags (deterministic, train) go there.
    """
    name = remat_policy_name(policy)
    if name == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES.get(name), static_argnums=static_argnums)


# ----------------------------------------------------------------------------------------- attention

def current_backend() -> str:
    """"cpu" | "gpu" | "tpu": where the attention runs (a function so tests can pretend to be a GPU/TPU)."""
    return jax.default_backend()


def tpu_flash_available() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


# The Pallas TPU flash kernel tiles sequences in blocks of 128 (its default BlockSizes).
TPU_FLASH_BLOCK = 128
HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def choose_attention(implementation: str, q, k, dropout: bool = False, backend: str | None = None) -> str:
    """The implementation `auto` resolves to for these operands on this backend; others pass through.

    GPU: cuDNN's fused flash attention, which takes half-precision operands and head dims <= 128 in
    multiples of 8. TPU: the Pallas flash kernel when both sequence lengths tile by 128. Attention
    dropout, CPU and every other case: the einsum path (float32 logits and softmax, XLA fuses it).
    """
    if implementation != "auto":
        return implementation
    backend = backend or current_backend()
    if dropout:
        return "einsum"
    head_dim = q.shape[-1]
    if backend in ("gpu", "cuda", "rocm") and q.dtype in HALF_DTYPES and head_dim <= 128 and head_dim % 8 == 0:
        return "cudnn"
    if (backend == "tpu" and tpu_flash_available() and q.shape[1] % TPU_FLASH_BLOCK == 0
            and k.shape[1] % TPU_FLASH_BLOCK == 0):
        return "tpu_flash"
    return "einsum"


def attention_logits(q, k, mask=None, bias=None):
    """Scaled QK^T in float32 whatever the operands' dtype (bf16 products accumulate and stay in f32):
    q [B, Lq, H, Dh], k [B, Lk, H, Dh] -> [B, H, Lq, Lk], masked positions at float32's minimum."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return logits


def einsum_attention(q, k, v, mask=None, bias=None, weights_dropout: Callable | None = None):
    """Softmax attention with float32 logits and softmax; `weights_dropout` (attention dropout) is applied
    to the float32 probabilities before they meet v."""
    weights = jax.nn.softmax(attention_logits(q, k, mask, bias), axis=-1)
    if weights_dropout is not None:
        weights = weights_dropout(weights)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def tpu_flash_attention(q, k, v, mask=None, bias=None):
    """Pallas TPU flash attention; its layout is [B, H, L, Dh] and a mask travels as an additive bias."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention
    b, lq, h, _ = q.shape
    ab = None
    if bias is not None or mask is not None:
        ab = jnp.zeros((b, h, lq, k.shape[1]), jnp.float32)
        ab = ab + (bias.astype(jnp.float32) if bias is not None else 0.0)
        if mask is not None:
            ab = jnp.where(mask, ab, jnp.finfo(jnp.float32).min)
    heads_first = lambda t: t.transpose(0, 2, 1, 3)
    out = flash_attention(heads_first(q), heads_first(k), heads_first(v), ab=ab, sm_scale=q.shape[-1] ** -0.5)
    return heads_first(out)


ATTENTION = Registry("attention implementation")
ATTENTION.register("einsum")(einsum_attention)
ATTENTION.register("xla")(lambda q, k, v, mask=None, bias=None: jax.nn.dot_product_attention(
    q, k, v, bias=bias, mask=mask, implementation="xla"))


@ATTENTION.register("cudnn")
def cudnn_attention(q, k, v, mask=None, bias=None):
    """jax's cuDNN fused attention. It checks the mask's last two dims against the full [T, S] and refuses a
    broadcast one, so the [B, 1, 1, S] key-padding masks (CRIS's cross-attention, BERT) are expanded here."""
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:-2] + (q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")


ATTENTION.register("tpu_flash")(tpu_flash_attention)


def dot_product_attention(q, k, v, mask=None, bias=None, implementation: str = "auto",
                          weights_dropout: Callable | None = None):
    """Softmax attention. q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, H, Dh].

    implementation: "auto" (per backend, see `choose_attention`), "einsum", "xla", "cudnn" or "tpu_flash".
    weights_dropout: attention dropout on the probabilities (training); it needs the einsum path.
    """
    name = choose_attention(implementation, q, k, dropout=weights_dropout is not None)
    if weights_dropout is not None:
        if name != "einsum":
            raise ValueError(f"attention dropout needs the einsum implementation, not {name!r}")
        return einsum_attention(q, k, v, mask, bias, weights_dropout)
    return ATTENTION.get(name)(q, k, v, mask=mask, bias=bias)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (HF CLIP/BERT layout)."""
    num_heads: int
    out_features: int | None = None
    use_bias: bool = True
    dropout_rate: float = 0.0
    implementation: str = "auto"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x, context=None, mask=None, bias=None, deterministic: bool = True):
        context = x if context is None else context
        d = x.shape[-1]
        out_d = self.out_features or d
        dh = d // self.num_heads
        dense = lambda name, f: nn.Dense(f, use_bias=self.use_bias, dtype=self.dtype, name=name)
        q = dense("query", d)(x).reshape(*x.shape[:-1], self.num_heads, dh)
        k = dense("key", d)(context).reshape(*context.shape[:-1], self.num_heads, dh)
        v = dense("value", d)(context).reshape(*context.shape[:-1], self.num_heads, dh)
        y = dot_product_attention(q, k, v, mask=mask, bias=bias, implementation=self.implementation,
                                  weights_dropout=attention_dropout(self.dropout_rate, deterministic))
        return dense("out", out_d)(y.reshape(*y.shape[:-2], d))


def attention_dropout(rate: float, deterministic: bool) -> Callable | None:
    """nn.Dropout on attention probabilities inside the calling module, or None when it is a no-op."""
    if rate <= 0.0 or deterministic:
        return None
    return lambda weights: nn.Dropout(rate)(weights, deterministic=False)


class Mlp(nn.Module):
    hidden: int
    activation: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        d = x.shape[-1]
        x = ACTIVATIONS[self.activation](nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return nn.Dense(d, dtype=self.dtype, name="fc2")(x)


class PreNormBlock(nn.Module):
    """x + attn(ln1(x)); x + mlp(ln2(x)) — the CLIP and timm-ViT encoder block."""
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-6
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True):
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln1")(x)
        y = MultiHeadAttention(self.num_heads, implementation=self.attention_impl, dtype=self.dtype,
                               name="attn")(y, mask=mask, deterministic=deterministic)
        x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln2")(x)
        y = Mlp(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(y, deterministic)
        return x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


# ----------------------------------------------------------------------------------------- convolution

# The convolution a model's nn.Conv layers run (`model.conv_impl`), passed to flax as `conv_general_dilated`
# so parameter names and shapes do not change. "xla": lax.conv_general_dilated (XLA's convolution emitter:
# cuDNN on GPU, the MXU on TPU, YNNPACK/Eigen on CPU). "matmul": im2col, the k*k shifted views of the padded
# input concatenated along channels and contracted with the [k*k*C, O] kernel in one dot_general, so the
# forward and both gradients are matmuls, pads, slices and adds. "matmul_filter_grad": XLA's forward and data
# gradient, the filter gradient as matmuls (unstrided: one dot of the input with the output gradient's k*k
# shifted views; strided: k*k dots of a shifted input view with the output gradient): XLA:CPU
# runs the filter gradient as a convolution whose window is the whole activation (the compiled HLO: input
# transposed to [C, H, W, B], the output gradient as a [H, W, B, O] kernel, so each window position contracts
# only the batch), 3-6x the forward's time at large activations (README, Benchmarks), while the same FLOPs as matmuls run near the forward's rate; below
# MATMUL_FILTER_GRAD_MIN_INPUT input elements XLA's own filter gradient is as fast or faster, so it keeps it.
# "winograd" / "winograd4" / "winograd_filter_grad": unstrided 3x3 convs by Winograd's minimal filtering
# (below), the rest as "matmul_filter_grad".
MATMUL_FILTER_GRAD_MIN_INPUT = 2 ** 22
CONV_IMPLS = Registry("convolution implementation")
CONV_IMPLS.register("xla")(jax.lax.conv_general_dilated)

_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lax's ConvDimensionNumbers of NHWC x HWIO -> NHWC


def _plain_conv_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, batch_group_count):
    """The explicit pads of a 2-D NHWC x HWIO convolution without dilation or groups, else None."""
    numbers = dimension_numbers and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (lhs.ndim != 4 or tuple(map(tuple, numbers or ())) != _NHWC_HWIO or feature_group_count != 1
            or batch_group_count != 1 or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))):
        return None
    pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
            if isinstance(padding, str) else [tuple(p) for p in padding])
    return None if any(p < 0 for pair in pads for p in pair) else tuple(pads)


def _shifted_views(lhs, kernel_hw, strides, pads):
    """The kh*kw views of the padded input that meet each kernel tap: each [B, Ho, Wo, C]."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0))) if any(p for pair in pads for p in pair) else lhs
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]


@CONV_IMPLS.register("matmul")
def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                preferred_element_type=None):
    """lax.conv_general_dilated's signature and result for a 2-D NHWC x HWIO convolution as one matmul of
    the input's patches; any other case (dilation, groups, other layouts) goes to lax.conv_general_dilated."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count)
    pads = _plain_conv_pads(*args)
    if pads is None:
        return jax.lax.conv_general_dilated(*args, precision, preferred_element_type)
    kh, kw, c, o = rhs.shape
    views = _shifted_views(lhs, (kh, kw), tuple(window_strides), pads)
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return jax.lax.dot_general(patches, rhs.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_matmul_filter_grad(lhs, rhs, strides, pads, precision, preferred_element_type):
    return jax.lax.conv_general_dilated(lhs, rhs, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision, preferred_element_type=preferred_element_type)


def _conv_matmul_filter_grad_fwd(lhs, rhs, strides, pads, precision, preferred_element_type):
    return _conv_matmul_filter_grad(lhs, rhs, strides, pads, precision, preferred_element_type), (lhs, rhs)


def _conv_matmul_filter_grad_bwd(strides, pads, precision, preferred_element_type, residuals, g):
    lhs, rhs = residuals
    conv = lambda x: jax.lax.conv_general_dilated(x, rhs, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                  precision=precision)
    d_lhs, = jax.vjp(conv, lhs)[1](g.astype(lhs.dtype))
    if tuple(strides) == (1, 1):
        return d_lhs, _filter_grad_shifted_g(lhs, g, rhs.shape, pads, precision).astype(rhs.dtype)
    # dW[i, j] = sum over batch and output positions of view_ij^T g: one [C, O] matmul per tap, in float32
    taps = [jax.lax.dot_general(v, g, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32)
            for v in _shifted_views(lhs, rhs.shape[:2], strides, pads)]
    d_rhs = jnp.stack(taps).reshape(rhs.shape).astype(rhs.dtype)
    return d_lhs, d_rhs


def _filter_grad_shifted_g(lhs, g, kernel_shape, pads, precision):
    """An unstrided convolution's filter gradient as one matmul: dW[i, j] = sum_m x[m] g[m + p - (i, j)]
    over the input positions m, so the k*k shifted views are taken of g (zero outside it) and concatenated
    along channels, and x [N, C] meets them in one [C, N] x [N, k*k*O] dot, in float32. One large matmul
    instead of k*k [C, O] ones (~20% faster for CRIS's [4, 104, 104, 512] -> 256 3x3 on a 2-core CPU)."""
    (kh, kw, c, o), (h, w) = kernel_shape, lhs.shape[1:3]
    (p0h, p1h), (p0w, p1w) = pads
    top, left = max(0, kh - 1 - p0h), max(0, kw - 1 - p0w)
    gp = jnp.pad(g.astype(lhs.dtype), ((0, 0), (top, max(0, kh - 1 - p1h)), (left, max(0, kw - 1 - p1w)), (0, 0)))
    views = [gp[:, p0h - i + top:p0h - i + top + h, p0w - j + left:p0w - j + left + w] for i in range(kh)
             for j in range(kw)]
    d = jax.lax.dot_general(lhs, jnp.concatenate(views, axis=-1), (((0, 1, 2), (0, 1, 2)), ((), ())),
                            precision=precision, preferred_element_type=jnp.float32)
    return d.reshape(c, kh, kw, o).transpose(1, 2, 0, 3)


_conv_matmul_filter_grad.defvjp(_conv_matmul_filter_grad_fwd, _conv_matmul_filter_grad_bwd)


@CONV_IMPLS.register("matmul_filter_grad")
def conv_matmul_filter_grad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                            dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                            preferred_element_type=None):
    """lax.conv_general_dilated whose filter gradient is k*k matmuls (see CONV_IMPLS) for inputs of at least
    MATMUL_FILTER_GRAD_MIN_INPUT elements; other cases (smaller inputs, 1x1 kernels, dilation, groups, other
    layouts) go to lax.conv_general_dilated."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count)
    pads = _plain_conv_pads(*args)
    if pads is None or lhs.size < MATMUL_FILTER_GRAD_MIN_INPUT or rhs.shape[:2] == (1, 1):
        return jax.lax.conv_general_dilated(*args, precision, preferred_element_type)
    return _conv_matmul_filter_grad(lhs, rhs, tuple(window_strides), pads, precision, preferred_element_type)


# Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
# Networks"): each m x m output tile of an unstrided 3x3 conv is A^T [(G g G^T) * (B^T d B)] A of its
# (m+2)^2 input tile d (tiles at stride m), so the products are (m+2)^2 matmuls [tiles, C] x [C, O], one per
# Winograd point: F(2, 3) 16 multiplies per 4 outputs against 36 (2.25x fewer FLOPs), F(4, 3) 36 per 16 (4x).
# Only the forward is written: the data gradient is the same Winograd conv of the output gradient (kernel
# turned 180 degrees), the filter gradient the forward's autodiff, the same batched matmuls contracting the
# tiles ([C, tiles] x [tiles, O], no k*k shifted copies). F(2, 3)'s transforms have entries 0, +-1, +-1/2, so
# its float32 error is a direct conv's (~5e-7 of the output's max against float64); F(4, 3)'s (+-5, 1/24, 8)
# lose about one digit (1e-5 to 2e-5 at 128-1024 input channels).
WINOGRAD_TRANSFORMS = {  # m: (B^T, G, A^T) from Lavin & Gray: F(2, 3) at points 0, +-1; F(4, 3) at 0, +-1, +-2
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}


def _combine(rows, coefficients):
    """sum_u c[u] * rows[u] for each row of coefficients, skipping zeros (the transforms are adds)."""
    out = []
    for cs in coefficients:
        terms = [(c, r) for c, r in zip(cs, rows) if c]
        acc = terms[0][1] if terms[0][0] == 1 else terms[0][0] * terms[0][1]
        for c, r in terms[1:]:
            acc = acc + r if c == 1 else (acc - r if c == -1 else acc + c * r)
        out.append(acc)
    return out


def _tile_rows(x, axis):
    """The m+2 rows of every tile along `axis` of x [..., T+1, m, ...] (the axis split into chunks of m):
    tile i's row u is chunk i's row u for u < m, chunk i+1's row u - m after, so unit slices select them
    (cheaper on XLA:CPU than strided slices of the unsplit axis, ~20% on CRIS's largest 3x3)."""
    m = x.shape[axis + 1]
    row = lambda chunks, u: jax.lax.index_in_dim(jax.lax.slice_in_dim(x, *chunks, axis=axis), u, axis + 1, False)
    t = x.shape[axis]
    return [row((0, t - 1), u) for u in range(m)] + [row((1, t), u) for u in range(2)]


def _winograd_input_tiles(x, m, tiles_h, tiles_w):
    """B^T d B of every (m+2)^2 tile (stride m) of the padded input x [B, m(th+1), m(tw+1), C] ->
    [(m+2)^2, B*th*tw, C], Winograd points first; separable, rows then columns, each stage one array."""
    b, c = x.shape[0], x.shape[-1]
    bt = WINOGRAD_TRANSFORMS[m][0]
    x = x.reshape(b, tiles_h + 1, m, tiles_w + 1, m, c)
    rows = jnp.stack(_combine(_tile_rows(x, 1), bt))  # [m+2, B, th, tw+1, m, C]
    cols = _combine(_tile_rows(rows, 3), bt)  # each [m+2, B, th, tw, C]
    return jnp.stack(cols, axis=1).reshape((m + 2) ** 2, -1, c)


def _winograd_output(prods, m, shape):
    """A^T M A of the products [(m+2)^2, B*th*tw, O] -> the [B, m th, m tw, O] output (tiles interleaved)."""
    (b, th, tw, o), t, at = shape, m + 2, WINOGRAD_TRANSFORMS[m][2]
    prods = prods.reshape(t, t, b, th, tw, o)
    cols = jnp.stack(_combine(list(prods), at))  # [m (r), t (q), B, th, tw, O]
    y = jnp.stack(_combine(list(cols.transpose(1, 0, 2, 3, 4, 5)), at))  # [m (s), m (r), B, th, tw, O]
    return y.transpose(2, 3, 1, 4, 0, 5).reshape(b, m * th, m * tw, o)


def _winograd_forward(lhs, rhs, pads, m, precision=None, preferred_element_type=None):
    """An unstrided NHWC x HWIO 3x3 convolution with explicit pads by F(m x m, 3x3); an output size that m
    does not divide is computed on the next multiple (the input padded with zeros) and cropped."""
    (b, h, w, c), o, t = lhs.shape, rhs.shape[-1], m + 2
    (p0h, p1h), (p0w, p1w) = pads
    ho, wo = h + p0h + p1h - 2, w + p0w + p1w - 2
    th, tw = -(-ho // m), -(-wo // m)
    x = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype),
                    ((0, 0, 0), (p0h, m * (th + 1) - h - p0h, 0), (p0w, m * (tw + 1) - w - p0w, 0), (0, 0, 0)))
    g = jnp.asarray(WINOGRAD_TRANSFORMS[m][1], rhs.dtype)
    u = jnp.einsum("pi,qj,ijco->pqco", g, g, rhs, precision=precision).reshape(t * t, c, o)
    prods = jax.lax.dot_general(_winograd_input_tiles(x, m, th, tw), u, (((2,), (1,)), ((0,), (0,))),
                                precision=precision, preferred_element_type=preferred_element_type)
    return _winograd_output(prods, m, (b, th, tw, o))[:, :ho, :wo]


def _xla_conv(lhs, rhs, pads, precision=None, preferred_element_type=None):
    return jax.lax.conv_general_dilated(lhs, rhs, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision, preferred_element_type=preferred_element_type)


def _winograd_or_xla(lhs, rhs, pads, m, winograd, precision=None, preferred_element_type=None):
    if winograd:
        return _winograd_forward(lhs, rhs, pads, m, precision, preferred_element_type)
    return _xla_conv(lhs, rhs, pads, precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _winograd_conv(lhs, rhs, pads, m, forward, precision, preferred_element_type):
    """forward: Winograd's F(m, 3) for the forward and data gradient, else XLA's conv; the filter gradient
    is Winograd's either way."""
    return _winograd_or_xla(lhs, rhs, pads, m, forward, precision, preferred_element_type)


def _winograd_conv_fwd(lhs, rhs, pads, m, forward, precision, preferred_element_type):
    return _winograd_conv(lhs, rhs, pads, m, forward, precision, preferred_element_type), (lhs, rhs)


def _winograd_conv_bwd(pads, m, forward, precision, preferred_element_type, residuals, g):
    """The data gradient is itself an unstrided 3x3 conv (of g with the kernel turned 180 degrees and in/out
    swapped, pads 2 - p), run by the same forward: differentiating the Winograd forward instead transposes
    its input transform into pads of strided scatters, ~2x slower. The filter gradient is the autodiff of
    the Winograd forward in rhs: 16 [C, tiles] x [tiles, O] dots."""
    lhs, rhs = residuals
    g = g.astype(lhs.dtype)
    flipped = rhs[::-1, ::-1].transpose(0, 1, 3, 2)
    d_lhs = _winograd_or_xla(g, flipped, tuple((2 - p0, 2 - p1) for p0, p1 in pads), m, forward, precision)
    d_rhs, = jax.vjp(lambda k: _winograd_forward(lhs, k, pads, m, precision), rhs)[1](g)
    return d_lhs.astype(lhs.dtype), d_rhs


_winograd_conv.defvjp(_winograd_conv_fwd, _winograd_conv_bwd)


# Inputs of fewer elements keep `matmul_filter_grad` (i.e. XLA's conv): there the transforms' passes over
# memory cost as much as the saved multiplies. Forward + both gradients, ms, F(4x4, 3x3) / XLA's forward and
# data gradient with the matmul filter gradient / torch (`python -m benchmarks.conv_shapes`, 2-core CPU at
# load ~14, two runs): [4, 52, 52, 512] -> 512 (5.5 M elements) 3497-4462 / 7383-7698 / 4777-5252;
# [4, 26, 26, 512] -> 512 (1.4 M) 1986-2773 / 1956-2104 / 1416-1636; [4, 26, 26, 256] -> 256 448-609 / 527-541
# (XLA's own conv 332-367) / 449-716.
WINOGRAD_MIN_INPUT = 2 ** 22


def _winograd_applies(pads, rhs, window_strides) -> bool:
    return (pads is not None and rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
            and all(0 <= p <= 2 for pair in pads for p in pair))


def winograd_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                  preferred_element_type=None, *, m: int = 2, forward: bool = True):
    """lax.conv_general_dilated's signature and result for an unstrided 2-D NHWC x HWIO 3x3 convolution
    (pads <= 2) by Winograd F(m x m, 3x3) (see above): forward and data gradient Winograd's (forward=True)
    or XLA's, the filter gradient Winograd's. Any other case (other kernels, strides, dilation, groups,
    layouts) goes to `matmul_filter_grad`."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count)
    pads = _plain_conv_pads(*args)
    if not _winograd_applies(pads, rhs, window_strides) or lhs.size < WINOGRAD_MIN_INPUT:
        return conv_matmul_filter_grad(*args, precision, preferred_element_type)
    return _winograd_conv(lhs, rhs, pads, m, forward, precision, preferred_element_type)


CONV_IMPLS.register("winograd")(functools.partial(winograd_conv, m=2))  # F(2x2, 3x3) in all three parts
CONV_IMPLS.register("winograd4")(functools.partial(winograd_conv, m=4))  # F(4x4, 3x3) in all three parts
CONV_IMPLS.register("winograd_filter_grad")(functools.partial(winograd_conv, m=2, forward=False))


# What "auto" runs per backend (others: "xla"). A table, so a benchmark can time a whole model under another
# implementation without a field of its own (`python -m benchmarks.speed_cris --conv-impl xla`).
# CPU: `matmul_filter_grad`. "winograd4" (F(4x4, 3x3) for unstrided 3x3 convs of >= WINOGRAD_MIN_INPUT input
# elements) beats it per conv at CRIS's large shapes (forward and both gradients ~1.5x oneDNN's direct kernels
# at [4, 104, 104, 512] -> 256) but has no quiet whole-step measurement yet, and its float32 error is 1e-5 to
# 2e-5 of the output's max (a direct conv's ~5e-7; "winograd", F(2x2, 3x3), keeps a direct conv's error).
AUTO_CONV = {"cpu": "matmul_filter_grad"}


def choose_conv(implementation: str, backend: str | None = None) -> str:
    """The implementation `auto` resolves to on this backend (AUTO_CONV, else "xla"); others pass through."""
    if implementation != "auto":
        return implementation
    return AUTO_CONV.get(backend or current_backend(), "xla")


def conv_fn(implementation: str = "auto"):
    """The `conv_general_dilated` to give nn.Conv for `model.conv_impl`."""
    return CONV_IMPLS.get(choose_conv(implementation))


def intercept_convs(method):
    """Decorator of a model's `__call__` (under @nn.compact): every nn.Conv called inside it, submodules
    included, that was not given its own `conv_general_dilated` runs `conv_fn(self.conv_impl)` ("auto" for a
    model without that field), so a backbone shared with other models needs no field of its own."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        fn = conv_fn(getattr(self, "conv_impl", "auto"))

        def interceptor(next_fun, call_args, call_kwargs, context):
            conv = context.module
            if (context.method_name != "__call__" or not isinstance(conv, nn.Conv)
                    or conv.conv_general_dilated is not None):
                return next_fun(*call_args, **call_kwargs)
            object.__setattr__(conv, "conv_general_dilated", fn)  # modules are frozen dataclasses
            try:
                return next_fun(*call_args, **call_kwargs)
            finally:
                object.__setattr__(conv, "conv_general_dilated", None)

        with nn.intercept_methods(interceptor):
            return method(self, *args, **kwargs)
    return wrapped

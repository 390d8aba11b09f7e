"""Transformer building blocks shared by CLIP, CLIPSeg, CRIS, BERT and MUMC.

Parameter names follow the roles (`query`, `key`, `value`, `out`, `fc1`, `fc2`) so that converters map
PyTorch state dicts by rule. Shapes: tokens are [B, L, D]; masks are boolean [B, 1|H, Lq, Lk], True = attend.
"""
from __future__ import annotations

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
ATTENTION.register("cudnn")(lambda q, k, v, mask=None, bias=None: jax.nn.dot_product_attention(
    q, k, v, bias=bias, mask=mask, implementation="cudnn"))
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

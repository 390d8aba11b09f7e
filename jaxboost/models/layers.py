"""Transformer building blocks shared by CLIP, CLIPSeg, CRIS, BERT and MUMC.

Parameter names follow the roles (`query`, `key`, `value`, `out`, `fc1`, `fc2`) so that converters map
PyTorch state dicts by rule. Shapes: tokens are [B, L, D]; masks are boolean [B, 1|H, Lq, Lk], True = attend.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def dot_product_attention(q, k, v, mask=None, bias=None, implementation: str = "einsum"):
    """Softmax attention. q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, H, Dh].

    `einsum` keeps the softmax in float32 and is what XLA fuses best on CPU; `xla`/`cudnn` hand off to
    `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs). The benchmarks pick per backend.
    """
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=implementation)
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (HF CLIP/BERT layout)."""
    num_heads: int
    out_features: int | None = None
    use_bias: bool = True
    dropout_rate: float = 0.0
    implementation: str = "einsum"
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
        if self.dropout_rate > 0.0 and not deterministic:
            # Dropout on attention probabilities needs the explicit path.
            scale = dh ** -0.5
            logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
            if bias is not None:
                logits = logits + bias
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
            w = nn.Dropout(self.dropout_rate)(jax.nn.softmax(logits, -1), deterministic=False).astype(v.dtype)
            y = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        else:
            y = dot_product_attention(q, k, v, mask=mask, bias=bias, implementation=self.implementation)
        return dense("out", out_d)(y.reshape(*y.shape[:-2], d))


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
    attention_impl: str = "einsum"
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

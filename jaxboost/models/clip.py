"""CLIP encoders (Radford et al. 2021) shared by CLIPSeg and CRIS.

- `TextEncoder`: token + learned position embeddings, causal pre-LN transformer (quick-GELU), final LN,
  pooled at the end-of-text token, linear projection. Returns every token's features and the projection.
- `vit_b16(...)`: the CLIP ViT is `jaxboost.models.vit.Model` with CLIP's fields (no patch bias, ln_pre,
  quick-GELU, eps 1e-5); `ln_post` applies per token, so taking the class token afterwards is CLIP's
  `post_layernorm(pooled)`.
- `ModifiedResNet`: OpenAI CLIP's RN50 (3-conv stem + avgpool, anti-aliased Bottlenecks that average-pool
  before strided work, attention pooling). `pool="clip"` is OpenAI's (mean token queries the grid, output
  [B, D_out]); `pool="cris"` is CRIS's variant (every position attends to every position, plus a 1x1
  conv+BN residual and ReLU, output a map [B, h, w, D_out]). The position embedding is resized with torch
  bicubic when the grid differs from the trained one.
All images NHWC.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxboost.models import layers, vit
from jaxboost.models.resize import resize_posemb_grid

# HF CLIP configs written before transformers PR #24773 carry eos_token_id=2; for them, and for OpenAI CLIP,
# the end-of-text token is found as the largest id in the row (it is the largest id in CLIP's vocabulary).
LEGACY_EOS_IDS = (None, 2)


def causal_mask(length: int):
    """[1, 1, L, L] boolean, True where query i may attend key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def eos_positions(input_ids, eos_token_id: int | None):
    """[B] index of the end-of-text token: argmax of ids (legacy), else the first `eos_token_id`."""
    if eos_token_id in LEGACY_EOS_IDS:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextEncoder(nn.Module):
    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    context_length: int = 77
    projection_dim: int | None = 512   # None: no projection (pooled features returned as they are)
    eos_token_id: int | None = None     # None/2: argmax pooling (OpenAI, CRIS); else HF's first-eos pooling
    activation: str = "quick_gelu"
    ln_eps: float = 1e-5
    attention_impl: str = "auto"
    remat: bool | str = False           # a remat policy name (layers.REMAT_POLICIES) for the blocks
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """input_ids [B, L] int, attention_mask [B, L] (1 = token, 0 = padding) or None.

        Returns (tokens [B, L, width] after the final LN, pooled [B, projection_dim]).
        """
        b, length = input_ids.shape
        if length > self.context_length:
            raise ValueError(f"input_ids has {length} tokens, more than the text encoder's context_length "
                             f"{self.context_length}")
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype,
                     name="token_embedding")(input_ids)  # CLIP init
        pos = self.param("pos_embedding", nn.initializers.normal(0.01), (self.context_length, self.width))
        x = x + pos[:length].astype(x.dtype)
        mask = causal_mask(length)
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        block_cls = layers.remat(layers.PreNormBlock, self.remat)
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, self.activation, self.ln_eps,
                                    attention_impl=self.attention_impl, dtype=self.dtype,
                                    name=f"block{i}")(x, mask)
        x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_final")(x)
        pooled = x[jnp.arange(b), eos_positions(input_ids, self.eos_token_id)]
        if self.projection_dim is not None:
            pooled = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                              name="text_projection")(pooled)
        return x, pooled


def clip_vit(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16, image_size=224,
             final_norm=True, attention_impl="auto", remat=False, dtype=None, name=None) -> vit.Model:
    """CLIP's vision transformer as a `vit.Model` (ViT-B/16 by default)."""
    return vit.Model(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, patch_size=patch_size,
                     image_size=image_size, activation="quick_gelu", ln_eps=1e-5, patch_bias=False,
                     pre_norm=True, final_norm=final_norm, attention_impl=attention_impl, remat=remat,
                     dtype=dtype, name=name)


def avg_pool(x, k: int):
    """torch AvgPool2d(k): kernel = stride = k, no padding, floor."""
    return x if k == 1 else nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


class BatchNorm(nn.Module):
    """torch's BatchNorm{1,2}d over the last axis, with flax BatchNorm's variable names (params scale/bias,
    batch_stats mean/var). Training normalises with the batch mean and biased variance and updates the
    running statistics as torch does: momentum 0.1 (torch's convention) and the *unbiased* batch variance,
    n / (n - 1) times flax's biased one (n = elements per channel: 8/7 for CRIS's text-gate BatchNorm1d at
    batch 8, 128/127 for a 4x4 map), so running statistics trained here are what the public PyTorch code
    trains and evaluates with."""
    use_running_average: bool = False
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        stats_dtype = jnp.promote_types(x.dtype, jnp.float32)   # statistics at least in float32, as flax
        if self.use_running_average:
            mean, var = running_mean.value.astype(stats_dtype), running_var.value.astype(stats_dtype)
        else:
            axes, n = tuple(range(x.ndim - 1)), x.size // c
            xs = x.astype(stats_dtype)
            mean = xs.mean(axes)
            var = jnp.maximum(jnp.square(xs).mean(axes) - jnp.square(mean), 0.0)   # flax's fast variance
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean.astype(jnp.float32)
                running_var.value = (1 - m) * running_var.value + m * (var * (n / max(n - 1, 1))).astype(jnp.float32)
        mul = scale.astype(stats_dtype) * jax.lax.rsqrt(var + self.epsilon)
        y = (x.astype(stats_dtype) - mean) * mul + bias.astype(stats_dtype)
        return y.astype(self.dtype or jnp.promote_types(x.dtype, jnp.float32))


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (torch's: eps 1e-5, momentum 0.1, unbiased running variance) -> optional ReLU."""
    features: int
    kernel: int = 1
    stride: int = 1
    relu: bool = True
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        pad = self.kernel // 2
        x = nn.Conv(self.features, (self.kernel,) * 2, (self.stride,) * 2, padding=[(pad, pad)] * 2,
                    use_bias=False, dtype=self.dtype, name="conv")(x)
        x = BatchNorm(not train, dtype=self.dtype, name="bn")(x)
        return nn.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """CLIP's anti-aliased bottleneck: the stride is an average pool after the 3x3 conv (and before the
    1x1 projection on the shortcut), so no convolution is strided."""
    planes: int
    stride: int = 1
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = ConvBN(self.planes, 1, dtype=self.dtype, name="c1")(x, train)
        out = ConvBN(self.planes, 3, dtype=self.dtype, name="c2")(out, train)
        out = avg_pool(out, self.stride)
        out = ConvBN(self.planes * 4, 1, relu=False, dtype=self.dtype, name="c3")(out, train)
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            x = ConvBN(self.planes * 4, 1, relu=False, dtype=self.dtype, name="downsample")(
                avg_pool(x, self.stride), train)
        return nn.relu(out + x)


class AttentionPool(nn.Module):
    """CLIP's attention pooling over a [B, h, w, C] grid (see the module docstring for the two modes)."""
    num_heads: int
    output_dim: int
    grid: int                 # the trained grid of the position embedding (input_resolution // 32)
    mode: str = "clip"        # "clip" | "cris"
    attention_impl: str = "auto"
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        pos = self.param("pos_embedding", nn.initializers.normal(c ** -0.5), (self.grid ** 2 + 1, c))
        grid_pos = pos[1:]
        if (h, w) != (self.grid, self.grid):
            grid_pos = resize_posemb_grid(grid_pos, (self.grid, self.grid), (h, w))
        tokens = x.reshape(b, h * w, c)
        dense = lambda name, f: nn.Dense(f, dtype=self.dtype, name=name)
        if self.mode == "clip":
            tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
            tokens = tokens + jnp.concatenate([pos[:1], grid_pos], axis=0)[None].astype(x.dtype)
            queries = tokens[:, :1]
        elif self.mode == "cris":
            tokens = tokens + grid_pos[None].astype(x.dtype)
            queries = tokens
        else:
            raise ValueError(f"AttentionPool.mode must be 'clip' or 'cris', got {self.mode!r}")
        dh = c // self.num_heads
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, dh)
        y = layers.dot_product_attention(split(dense("query", c)(queries)), split(dense("key", c)(tokens)),
                                         split(dense("value", c)(tokens)), implementation=self.attention_impl)
        y = dense("out", self.output_dim)(y.reshape(*y.shape[:2], c))
        if self.mode == "clip":
            return y[:, 0]
        y = y.reshape(b, h, w, self.output_dim)
        residual = ConvBN(self.output_dim, 1, relu=False, dtype=self.dtype, name="connect")(x, train)
        return nn.relu(y + residual)


class ModifiedResNet(nn.Module):
    """OpenAI CLIP's modified ResNet (RN50 by default). images [B, H, W, 3].

    Returns (c3 [B, H/8, W/8, 8w], c4 [B, H/16, W/16, 16w], pooled): pooled is [B, output_dim] for
    pool="clip" and a map [B, H/32, W/32, output_dim] for pool="cris".
    """
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    num_heads: int = 32
    output_dim: int = 1024
    image_size: int = 224
    pool: str = "clip"
    attention_impl: str = "auto"
    remat: bool | str = False           # a remat policy name (layers.REMAT_POLICIES) for the Bottlenecks
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, images, train: bool = False):
        if images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
        x = ConvBN(self.width // 2, 3, stride=2, dtype=self.dtype, name="stem1")(images, train)
        x = ConvBN(self.width // 2, 3, dtype=self.dtype, name="stem2")(x, train)
        x = ConvBN(self.width, 3, dtype=self.dtype, name="stem3")(x, train)
        x = avg_pool(x, 2)
        feats = []
        bottleneck = layers.remat(Bottleneck, self.remat, static_argnums=(2,))
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                x = bottleneck(self.width * 2 ** stage, stride, dtype=self.dtype,
                               name=f"layer{stage + 1}_{i}")(x, train)
            feats.append(x)
        pooled = AttentionPool(self.num_heads, self.output_dim, self.image_size // 32, self.pool,
                               self.attention_impl, self.dtype, name="attnpool")(x, train)
        return feats[1], feats[2], pooled

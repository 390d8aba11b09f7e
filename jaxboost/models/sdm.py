"""Semantic diffusion model (SDM, Wang et al. 2022): a guided-diffusion U-Net conditioned on a label map.

The encoder is guided-diffusion's (ResBlocks with GroupNorm32, timestep scale-shift, attention at chosen
resolutions, residual-block down-sampling). The middle and decoder ResBlocks replace both group norms by
SPADE group norm: GroupNorm(32, affine=False)(h) * (1 + gamma) + beta, where gamma, beta come from the one-hot
label map resized (nearest) to the feature size through conv3x3(L -> 128) + ReLU, then conv3x3(128 -> C).
An all-zero label map is the unconditional input used for classifier-free guidance (as upstream SDM).

NHWC inside: x [B, H, W, C], timesteps [B], labels [B, H, W, L] -> [B, H, W, out_channels] where
out_channels = 2 * in_channels with learned variance (eps, then the variance interpolation value).
Submodule names follow upstream's `input_blocks.i.j` layout so the converter maps names one to one.
Group norms, the SPADE norm and attention softmax run in float32; the rest in `dtype`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxboost.models.resize import resize_nearest

from jaxboost.models import layers

SPADE_HIDDEN = 128  # upstream's; `Model.spade_hidden` lowers it for CPU-sized configs


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [B, dim]: cos of the first half of frequencies, then sin (guided-diffusion order)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def conv3x3(features: int, name: str, dtype, stride: int = 1, zero_init: bool = False, impl: str = "auto"):
    """3x3 conv with torch's padding 1; zero_init for the layers guided-diffusion zeroes (residual outputs);
    impl: layers.CONV_IMPLS name or "auto" (per backend, `layers.choose_conv`)."""
    init = nn.initializers.zeros if zero_init else nn.linear.default_kernel_init
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=dtype,
                   kernel_init=init, conv_general_dilated=layers.conv_fn(impl), name=name)


def group_norm(x, name: str, affine: bool = True):
    """GroupNorm(32) computed in float32 and cast back (guided-diffusion's GroupNorm32)."""
    norm = nn.GroupNorm(num_groups=32, epsilon=1e-5, use_scale=affine, use_bias=affine,
                        use_fast_variance=False, dtype=jnp.float32, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class SpadeGroupNorm(nn.Module):
    """GroupNorm(32, affine=False)(x) * (1 + gamma) + beta with gamma/beta predicted from the label map.

    The convs run in `dtype`; the modulation runs in float32 on the float32 norm (a bf16 product would round
    the normalised activations to 8 bits before the residual sum), cast back to x's dtype at the end.
    """
    dtype: Any = jnp.float32
    hidden: int = SPADE_HIDDEN
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, labels):
        c = x.shape[-1]
        normed = group_norm(x.astype(jnp.float32), "norm", affine=False)
        seg = resize_nearest(labels, x.shape[1:3]).astype(self.dtype)
        conv = lambda features, name: conv3x3(features, name, self.dtype, impl=self.conv_impl)
        actv = nn.relu(conv(self.hidden, "mlp_shared")(seg))
        gamma = conv(c, "mlp_gamma")(actv)
        beta = conv(c, "mlp_beta")(actv)
        f32 = lambda a: a.astype(jnp.float32)
        return (normed * (1 + f32(gamma)) + f32(beta)).astype(x.dtype)


def upsample_nearest2x(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2x(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """guided-diffusion ResBlock; `spade=True` is SDM's SDMResBlock (both norms SPADE-conditioned).

    updown: None | "up" | "down" (resample h after the input norm+SiLU and x before the skip).
    """
    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    spade: bool = False
    updown: str | None = None
    dtype: Any = jnp.float32
    spade_hidden: int = SPADE_HIDDEN
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, labels, emb, train: bool = False):
        norm = ((lambda h, name: SpadeGroupNorm(self.dtype, self.spade_hidden, self.conv_impl, name=name)(h, labels))
                if self.spade
                else (lambda h, name: group_norm(h, name)))
        resample = {None: lambda a: a, "up": upsample_nearest2x, "down": avg_pool2x}[self.updown]
        h = nn.silu(norm(x, "in_norm"))
        h, x = resample(h), resample(x)
        h = conv3x3(self.out_channels, "in_conv", self.dtype, impl=self.conv_impl)(h)
        emb_out = nn.Dense(2 * self.out_channels if self.use_scale_shift_norm else self.out_channels,
                           dtype=self.dtype, name="emb_dense")(nn.silu(emb))[:, None, None, :].astype(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm(h, "out_norm") * (1 + scale) + shift
        else:
            h = norm(h + emb_out, "out_norm")
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv3x3(self.out_channels, "out_conv", self.dtype, zero_init=True, impl=self.conv_impl)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype,
                        conv_general_dilated=layers.conv_fn(self.conv_impl),
                        name="skip_connection")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions with guided-diffusion's fused qkv projection.

    Heads: `channels // num_head_channels`, or `num_heads` when num_head_channels == -1 (upstream's rule).
    The fused channels are laid out [head][q|k|v][head_dim] in the legacy order (QKVAttentionLegacy, SDM's
    default) and [q|k|v][head][head_dim] with use_new_attention_order (QKVAttention, as echo_from_noise
    trains); the weights look the same either way, so the order is a config field, never inferred.
    `implementation` goes to jax.nn.dot_product_attention (None: XLA; "cudnn": fused flash attention on GPU).
    """
    num_head_channels: int = 64
    dtype: Any = jnp.float32
    implementation: str | None = None
    num_heads: int = 1
    use_new_attention_order: bool = False

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        if self.num_head_channels == -1:
            heads = self.num_heads
        elif c % self.num_head_channels:
            raise ValueError(f"attention channels {c} not divisible by num_head_channels {self.num_head_channels}")
        else:
            heads = c // self.num_head_channels
        if c % heads:
            raise ValueError(f"attention channels {c} not divisible by num_heads {heads}")
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(group_norm(x, "norm").reshape(b, hgt * wid, c))
        if self.use_new_attention_order:
            q, k, v = (a[:, :, 0] for a in jnp.split(qkv.reshape(b, hgt * wid, 3, heads, c // heads), 3, axis=2))
        else:
            q, k, v = jnp.split(qkv.reshape(b, hgt * wid, heads, 3 * (c // heads)), 3, axis=-1)
        h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation).reshape(b, hgt * wid, c)
        h = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(h)
        return x + h.reshape(b, hgt, wid, c)


class Model(nn.Module):
    """SDM U-Net. attention_resolutions are feature sizes in pixels (e.g. (32, 16, 8) at image_size 256)."""
    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (32, 16, 8)
    num_head_channels: int = 64  # -1: a fixed head count, num_heads (num_heads_upsample in the decoder)
    num_heads: int = 1
    num_heads_upsample: int = -1  # -1: num_heads
    use_new_attention_order: bool = False  # upstream's flag; echo_from_noise trains with True
    num_labels: int = 5
    learn_sigma: bool = True
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    dtype: Any = jnp.float32
    remat_policy: str = "none"  # layers.REMAT_POLICIES: activation checkpointing of ResBlocks and attention
    attention_implementation: str | None = None  # jax.nn.dot_product_attention's: None (XLA) or "cudnn"
    spade_hidden: int = SPADE_HIDDEN  # SPADE's shared conv width (upstream 128)
    conv_impl: str = "auto"  # layers.CONV_IMPLS name or "auto" (per backend: layers.choose_conv)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @nn.compact
    def __call__(self, x, timesteps, labels, train: bool = False):
        """x [B, H, W, in_channels], timesteps [B], labels one-hot [B, H, W, num_labels] -> [B, H, W, out]."""
        if labels.shape[-1] != self.num_labels:
            raise ValueError(f"labels have {labels.shape[-1]} channels but the model has num_labels="
                             f"{self.num_labels} (labels must be one-hot [B, H, W, num_labels])")
        if x.shape[-1] != self.in_channels or labels.shape[:3] != x.shape[:3]:
            raise ValueError(f"x {x.shape} and labels {labels.shape} must be [B, H, W, {self.in_channels}] and "
                             f"[B, H, W, {self.num_labels}] with the same B, H, W")
        dtype = jnp.dtype(self.dtype)  # configs give it as a string ("bfloat16")
        block = layers.remat(ResBlock, self.remat_policy, static_argnums=(4,))
        attn = layers.remat(AttentionBlock, self.remat_policy)
        res = lambda name, ch, **kw: block(ch, self.dropout, self.use_scale_shift_norm, dtype=dtype,
                                           spade_hidden=self.spade_hidden, conv_impl=self.conv_impl, name=name, **kw)
        decoder_heads = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        attention = lambda name, heads=self.num_heads: attn(
            self.num_head_channels, dtype, self.attention_implementation, heads, self.use_new_attention_order,
            name=name)
        attend_at = {self.image_size // r for r in self.attention_resolutions}  # as downsample factors

        temb_dim = 4 * self.model_channels
        emb = timestep_embedding(timesteps, self.model_channels)
        emb = nn.Dense(temb_dim, dtype=dtype, name="time_embed_0")(emb)
        emb = nn.Dense(temb_dim, dtype=dtype, name="time_embed_2")(nn.silu(emb))

        labels = labels.astype(dtype)
        h = conv3x3(self.channel_mult[0] * self.model_channels, "input_blocks_0_0", dtype,
                    impl=self.conv_impl)(x.astype(dtype))
        skips, ds, idx = [h], 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = res(f"input_blocks_{idx}_0", mult * self.model_channels)(h, labels, emb, train)
                if ds in attend_at:
                    h = attention(f"input_blocks_{idx}_1")(h)
                skips.append(h)
                idx += 1
            if level != len(self.channel_mult) - 1:
                h = self._downsample(f"input_blocks_{idx}_0", res, h, labels, emb, train)
                skips.append(h)
                idx, ds = idx + 1, ds * 2

        h = res("middle_block_0", h.shape[-1], spade=True)(h, labels, emb, train)
        h = attention("middle_block_1")(h)
        h = res("middle_block_2", h.shape[-1], spade=True)(h, labels, emb, train)

        idx = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(f"output_blocks_{idx}_0", mult * self.model_channels, spade=True)(h, labels, emb, train)
                j = 1
                if ds in attend_at:
                    h = attention(f"output_blocks_{idx}_1", decoder_heads)(h)
                    j = 2
                if level and i == self.num_res_blocks:
                    h = self._upsample(f"output_blocks_{idx}_{j}", res, h, labels, emb, train)
                    ds //= 2
                idx += 1

        h = nn.silu(group_norm(h, "out_0"))
        return conv3x3(self.out_channels, "out_2", dtype, zero_init=True, impl=self.conv_impl)(h).astype(jnp.float32)

    def _downsample(self, name, res, h, labels, emb, train):
        if self.resblock_updown:
            return res(name, h.shape[-1], updown="down")(h, labels, emb, train)
        return conv3x3(h.shape[-1], name + "_op", jnp.dtype(self.dtype), stride=2, impl=self.conv_impl)(h)

    def _upsample(self, name, res, h, labels, emb, train):
        if self.resblock_updown:
            return res(name, h.shape[-1], spade=True, updown="up")(h, labels, emb, train)
        return conv3x3(h.shape[-1], name + "_conv", jnp.dtype(self.dtype), impl=self.conv_impl)(upsample_nearest2x(h))

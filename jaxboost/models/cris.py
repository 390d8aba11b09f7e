"""CRIS (Wang et al. 2022): CLIP-driven referring image segmentation, as CRIS.pytorch computes it.

pixel_values [B, H, W, 3] (416 px), input_ids/attention_mask [B, L] -> logits [B, H, W] (or [B, H/4, W/4]).
- CLIP RN50 image tower with CRIS's attention pooling -> c3 [H/8], c4 [H/16], c5 [H/32] features; CLIP text
  tower -> word features [B, L, 512] (final LN, unprojected; causal attention only) and the sentence state
  [B, 1024] (end-of-text token, projected).
- Neck: text-gated FPN (c5 * txt_proj(state), fused down to H/16) with CoordConv -> [B, H/16, W/16, 512].
- Decoder: pre-LN layers of pixel self-attention and pixel-to-word cross-attention (sine position
  encodings added to queries/keys), each attention output layer-normed before the residual; final LN.
- Projector: upsample x4 through convs to 256 channels at H/4 and apply a per-sample 3x3 conv whose
  weights and bias come from the sentence state.
`pad_mode="fixed"` hides padded words from cross-attention (attention_mask == 0); "original" is the public
finetuning code, which tests `input_ids == 0` while the tokenizer pads with <|endoftext|>: nothing masked.
`upsample`: "bicubic_align" (default: bicubic with align_corners=True to the input size, as medvlsm, the
Synthetic Boost code, trains and predicts), "bilinear", "none" (the H/4 map CRIS.pytorch trains on; the loss then
compares it with the nearest-downsampled mask, and evaluation resizes the probabilities to each mask).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxboost.models import clip, layers
from jaxboost.models.resize import resize_nhwc


def sine_posemb_1d(length: int, dim: int) -> np.ndarray:
    """[L, D]: sin on even channels, cos on odd ones (Transformer encoding), as CRIS's pos1d."""
    pos = np.arange(length, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * -(math.log(10000.0) / dim))
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return pe


def sine_posemb_2d(h: int, w: int, dim: int) -> np.ndarray:
    """[h*w, D]: first half of the channels encodes x, the second half y, interleaved sin/cos (pos2d)."""
    half = dim // 2
    px, py = sine_posemb_1d(w, half), sine_posemb_1d(h, half)
    return np.concatenate([np.broadcast_to(px[None], (h, w, half)),
                           np.broadcast_to(py[:, None], (h, w, half))], -1).reshape(h * w, dim)


class Attention(nn.Module):
    """Multi-head attention with separate query/key/value inputs (torch nn.MultiheadAttention)."""
    num_heads: int
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, q_in, k_in, v_in, mask=None, deterministic: bool = True):
        d = q_in.shape[-1]
        dh = d // self.num_heads
        dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
        q = dense("query")(q_in).reshape(*q_in.shape[:2], self.num_heads, dh)
        k = dense("key")(k_in).reshape(*k_in.shape[:2], self.num_heads, dh)
        v = dense("value")(v_in).reshape(*v_in.shape[:2], self.num_heads, dh)
        y = layers.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl,
                                         weights_dropout=layers.attention_dropout(self.dropout_rate, deterministic))
        return dense("out")(y.reshape(*y.shape[:2], d))


class DecoderLayer(nn.Module):
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_impl: str = "auto"
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, vis, vis_pos, words, word_pos, word_mask, deterministic: bool = True):
        """vis [B, N, D], words [B, L, D], word_mask [B, 1, 1, L] (True = attend)."""
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        drop = lambda x: nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        attn = lambda name: Attention(self.num_heads, self.dropout_rate, self.attention_impl, self.dtype, name=name)
        v = ln("norm1")(vis)
        y = attn("self_attn")(v + vis_pos, v + vis_pos, v, deterministic=deterministic)
        vis = vis + drop(ln("self_attn_norm")(y))
        v = ln("norm2")(vis)
        y = attn("cross_attn")(v + vis_pos, words + word_pos, words, word_mask, deterministic)
        vis = vis + drop(ln("cross_attn_norm")(y))
        y = ln("norm3")(vis)
        y = drop(nn.relu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="ffn_fc1")(y)))
        y = nn.Dense(vis.shape[-1], dtype=self.dtype, name="ffn_fc2")(ln("ffn_norm")(y))
        return vis + drop(y)


def upsample2x(x):
    """torch Upsample(scale_factor=2, mode='bilinear', align_corners=False)."""
    return resize_nhwc(x, (2 * x.shape[1], 2 * x.shape[2]), "bilinear")


def coord_features(b: int, h: int, w: int, dtype):
    """CoordConv's extra channels [B, h, w, 2]: x then y, each linspace(-1, 1)."""
    y, x = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
    return jnp.broadcast_to(jnp.stack([x, y], -1)[None], (b, h, w, 2)).astype(dtype)


class Neck(nn.Module):
    """CRIS's text-gated FPN with CoordConv. c3/c4/c5 at H/8, H/16, H/32 -> [B, H/16, W/16, out[1]]."""
    out_channels: tuple[int, int, int] = (256, 512, 1024)
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, c3, c4, c5, state, train: bool = False):
        o0, o1, o2 = self.out_channels
        cb = lambda f, k, name: clip.ConvBN(f, k, dtype=self.dtype, name=name)
        bn = lambda name: clip.BatchNorm(not train, dtype=self.dtype, name=name)
        gate = nn.relu(bn("txt_proj_bn")(nn.Dense(o2, use_bias=False, dtype=self.dtype, name="txt_proj")(state)))
        f5 = nn.relu(bn("f1_norm")(cb(o2, 1, "f1_v_proj")(c5, train) * gate[:, None, None]))
        f4 = cb(o1, 1, "f2_cat")(jnp.concatenate([cb(o1, 3, "f2_v_proj")(c4, train), upsample2x(f5)], -1), train)
        f3 = clip.avg_pool(cb(o0, 3, "f3_v_proj")(c3, train), 2)
        f3 = cb(o1, 1, "f3_cat")(jnp.concatenate([f3, f4], -1), train)
        fq = jnp.concatenate([cb(o1, 3, "f4_proj3")(f3, train), cb(o1, 3, "f4_proj4")(f4, train),
                              upsample2x(cb(o1, 3, "f4_proj5")(f5, train))], -1)
        fq = cb(o1, 1, "aggr")(fq, train)
        b, h, w, _ = fq.shape
        fq = cb(o1, 3, "coordconv")(jnp.concatenate([fq, coord_features(b, h, w, fq.dtype)], -1), train)
        return cb(o1, 3, "coordconv_out")(fq, train)


class Projector(nn.Module):
    """Visual upsampling (x4) and the text-to-pixel dynamic 3x3 conv -> logits [B, 4h, 4w]."""
    in_dim: int = 256
    kernel_size: int = 3
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, x, state, train: bool = False):
        x = clip.ConvBN(2 * self.in_dim, 3, dtype=self.dtype, name="vis_conv1")(upsample2x(x), train)
        x = clip.ConvBN(self.in_dim, 3, dtype=self.dtype, name="vis_conv2")(upsample2x(x), train)
        x = nn.Conv(self.in_dim, (1, 1), dtype=self.dtype, name="vis_out")(x)
        b, h, w, c = x.shape
        k = self.kernel_size
        dyn = nn.Dense(c * k * k + 1, dtype=self.dtype, name="txt")(state)
        kernel = dyn[:, :-1].reshape(b, c, k, k).astype(x.dtype)   # torch's [B, C, k, k]: one filter per sample
        return dynamic_conv(x, kernel) + dyn[:, -1][:, None, None]


def dynamic_conv(x, kernel):
    """Each sample's image [h, w, C] cross-correlated with its own filter [C, k, k] ("same" padding) ->
    [B, h, w]: CRIS's F.conv2d(x.reshape(1, B*C, h, w), weight, groups=B).

    Not as one grouped convolution: XLA:CPU rewrites the filter gradient of a grouped convolution (a
    batch-grouped one) into a 3-D convolution over a dilated input that runs outside its convolution
    library (~70% of the CRIS train step at 96 px; 18 s of fwd+bwd at 416 px). Instead each sample's
    channels are contracted with its k*k taps in one batched matmul ([h*w, C] x [C, k*k]), whose taps are
    then summed at their k*k shifts; forward and gradients are dots and a few elementwise adds."""
    b, h, w, c = x.shape
    k = kernel.shape[-1]
    taps = jnp.einsum("bhwc,bcq->bhwq", x, kernel.reshape(b, c, k * k))
    taps = jnp.pad(taps, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = jnp.zeros((b, h, w), x.dtype)
    for i in range(k):
        for j in range(k):
            out = out + taps[:, i:i + h, j:j + w, i * k + j]
    return out


class Model(nn.Module):
    # CLIP RN50
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    vision_width: int = 64
    embed_dim: int = 1024                 # CLIP's joint embedding: c5 and the sentence state width
    vision_image_size: int = 224          # grid CLIP's attention-pool position embedding was trained at
    vocab_size: int = 49408
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    context_length: int = 77
    # CRIS head
    fpn_out: tuple[int, int, int] = (256, 512, 1024)
    num_layers: int = 3
    num_heads: int = 8
    mlp_dim: int = 2048
    dropout_rate: float = 0.1             # 0.1 in CRIS; 0.2 in the Synthetic Boost finetuning code
    pad_mode: str = "fixed"               # "fixed" | "original" (see the module docstring)
    upsample: str = "bicubic_align"       # "bicubic_align" | "bilinear" | "none"
    freeze_encoders: bool = False         # CRIS trains the backbone (at 0.1x the learning rate)
    attention_impl: str = "auto"
    remat_policy: str = "none"            # layers.REMAT_POLICIES: activation checkpointing of every block
    dtype: layers.Dtype | None = None

    @nn.compact
    @layers.intercept_convs  # large convs' filter gradients as matmuls on CPU (layers.CONV_IMPLS)
    def __call__(self, pixel_values, input_ids, attention_mask=None, train: bool = False):
        """pixel_values [B, H, W, 3], input_ids [B, L], attention_mask [B, L] -> logits [B, H, W]."""
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
            raise ValueError(f"pixel_values must be [B, H, W, 3] (NHWC, RGB), got shape {pixel_values.shape}")
        if pixel_values.shape[1] % 32 or pixel_values.shape[2] % 32:
            raise ValueError(f"pixel_values height/width {pixel_values.shape[1:3]} must be multiples of 32")
        if self.pad_mode not in ("fixed", "original"):
            raise ValueError(f"pad_mode must be 'fixed' or 'original', got {self.pad_mode!r}")
        encoders_train = train and not self.freeze_encoders
        c3, c4, c5 = clip.ModifiedResNet(self.stage_sizes, self.vision_width, self.vision_width * 32 // 64,
                                         self.embed_dim, self.vision_image_size, pool="cris",
                                         attention_impl=self.attention_impl, remat=self.remat_policy,
                                         dtype=self.dtype, name="visual")(pixel_values, encoders_train)
        words, state = clip.TextEncoder(self.vocab_size, self.text_width, self.text_depth, self.text_heads,
                                        4 * self.text_width, self.context_length, self.embed_dim, None,
                                        attention_impl=self.attention_impl, remat=self.remat_policy,
                                        dtype=self.dtype, name="text")(input_ids)   # CRIS: causal attention only
        if self.freeze_encoders:
            c3, c4, c5, words, state = jax.lax.stop_gradient((c3, c4, c5, words, state))
        if self.pad_mode == "original" or attention_mask is None:
            word_mask = input_ids != 0
        else:
            word_mask = attention_mask > 0
        fq = Neck(self.fpn_out, self.dtype, name="neck")(c3, c4, c5, state, train)
        b, h, w, d = fq.shape
        vis = fq.reshape(b, h * w, d)
        vis_pos = jnp.asarray(sine_posemb_2d(h, w, d), vis.dtype)[None]
        word_pos = jnp.asarray(sine_posemb_1d(words.shape[1], words.shape[-1]), words.dtype)[None]
        decoder_layer = layers.remat(DecoderLayer, self.remat_policy, static_argnums=(6,))
        for i in range(self.num_layers):
            vis = decoder_layer(self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_impl, self.dtype,
                               name=f"decoder_layer{i}")(vis, vis_pos, words, word_pos,
                                                         word_mask[:, None, None, :], not train)
        vis = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm")(vis)
        logits = Projector(d // 2, dtype=self.dtype, name="proj")(vis.reshape(b, h, w, d), state, train)
        size = pixel_values.shape[1:3]
        if self.upsample == "none":
            return logits.astype(jnp.float32)
        mode, align = {"bilinear": ("bilinear", False), "bicubic_align": ("bicubic", True)}[self.upsample]
        return resize_nhwc(logits[..., None], size, mode, align)[..., 0].astype(jnp.float32)


"""CLIPSeg (Lüddecke & Ecker 2022) as HF `CLIPSegForImageSegmentation` computes it (rd64-refined defaults).

pixel_values [B, H, W, 3] (ImageNet-normalised), input_ids/attention_mask [B, L] -> logits [B, H, W].
CLIP ViT-B/16 activations after blocks `extract_layers` are reduced to `reduce_dim`, summed from the deepest
one down, FiLM-modulated by the projected (un-normalised) text embedding at decoder block
`conditional_layer`, passed through post-LN decoder blocks (ReLU MLP), and upsampled by the head.
The vision tower only runs the blocks the decoder reads (HF runs all 12; the rest feed nothing here).
`freeze_encoders=True` is HF-exact: HF computes both encoders under no_grad, so no gradient reaches them.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxboost.models import clip, layers


class PostNormBlock(nn.Module):
    """CLIPSeg's decoder block: x = ln1(x + attn(x)); x = ln2(x + mlp(x))."""
    num_heads: int
    mlp_dim: int
    activation: str = "relu"
    ln_eps: float = 1e-5
    attention_impl: str = "auto"
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, x):
        y = layers.MultiHeadAttention(self.num_heads, implementation=self.attention_impl, dtype=self.dtype,
                                      name="attn")(x)
        x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln1")(x + y)
        y = layers.Mlp(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(x)
        return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln2")(x + y)


class Model(nn.Module):
    # CLIP vision tower (ViT-B/16)
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    patch_size: int = 16
    vision_image_size: int = 224          # grid the position embedding was trained at
    # CLIP text tower
    vocab_size: int = 49408
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    context_length: int = 77
    eos_token_id: int | None = 2          # rd64-refined's config: 2 = legacy argmax pooling
    projection_dim: int = 512
    # decoder
    extract_layers: tuple[int, ...] = (3, 6, 9)
    reduce_dim: int = 64
    decoder_heads: int = 4
    decoder_mlp_dim: int = 2048
    conditional_layer: int = 0
    complex_transposed_conv: bool = True  # rd64-refined: conv3x3 -> ConvT(/4) -> ConvT(/4)
    # The complex head's two ConvT kernels (= strides); (): HF's (patch/4, patch/4), which restores the input
    # size only at patch 16. A finer grid sets its own, e.g. (2, 2) at patch 4.
    head_kernels: tuple[int, ...] = ()
    freeze_encoders: bool = True
    attention_impl: str = "auto"
    remat_policy: str = "none"            # layers.REMAT_POLICIES: activation checkpointing of every block
    dtype: layers.Dtype | None = None

    def _encode(self, pixel_values, input_ids, attention_mask):
        """-> (activations: list of [B, 1+N, D_vision] deepest first, conditional embedding [B, P])."""
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
            raise ValueError(f"pixel_values must be [B, H, W, 3] (NHWC, RGB), got shape {pixel_values.shape}")
        if pixel_values.shape[1] % self.patch_size or pixel_values.shape[2] % self.patch_size:
            raise ValueError(f"pixel_values height/width {pixel_values.shape[1:3]} must be multiples of the "
                             f"patch size {self.patch_size}")
        if max(self.extract_layers) >= self.vision_depth:
            raise ValueError(f"extract_layers {self.extract_layers} must be < vision_depth {self.vision_depth}")
        vision = clip.clip_vit(self.vision_width, max(self.extract_layers) + 1, self.vision_heads,
                               self.vision_mlp_dim, self.patch_size, self.vision_image_size, final_norm=False,
                               attention_impl=self.attention_impl, remat=self.remat_policy, dtype=self.dtype,
                               name="vision")
        text = clip.TextEncoder(self.vocab_size, self.text_width, self.text_depth, self.text_heads,
                                self.text_mlp_dim, self.context_length, self.projection_dim, self.eos_token_id,
                                attention_impl=self.attention_impl, remat=self.remat_policy, dtype=self.dtype,
                                name="text")
        _, hidden = vision(pixel_values, output_hidden_states=True)
        activations = [hidden[i + 1] for i in self.extract_layers][::-1]
        _, conditional = text(input_ids, attention_mask)
        if self.freeze_encoders:
            activations, conditional = jax.lax.stop_gradient((activations, conditional))
        return activations, conditional

    @nn.compact
    def __call__(self, pixel_values, input_ids, attention_mask=None, train: bool = False):
        """pixel_values [B, H, W, 3] float, input_ids [B, L] int, attention_mask [B, L] -> logits [B, H, W]."""
        activations, conditional = self._encode(pixel_values, input_ids, attention_mask)
        b, h, w, _ = pixel_values.shape
        x = None
        decoder_block = layers.remat(PostNormBlock, self.remat_policy)
        for i, act in enumerate(activations):
            reduced = nn.Dense(self.reduce_dim, dtype=self.dtype, name=f"reduce{i}")(act)
            x = reduced if x is None else x + reduced
            if i == self.conditional_layer:
                mul = nn.Dense(self.reduce_dim, dtype=self.dtype, name="film_mul")(conditional)
                add = nn.Dense(self.reduce_dim, dtype=self.dtype, name="film_add")(conditional)
                x = mul[:, None] * x + add[:, None]
            x = decoder_block(self.decoder_heads, self.decoder_mlp_dim, attention_impl=self.attention_impl,
                              dtype=self.dtype, name=f"decoder_block{i}")(x)
        gh, gw = h // self.patch_size, w // self.patch_size
        x = x[:, 1:].reshape(b, gh, gw, self.reduce_dim)
        if self.complex_transposed_conv:
            k1, k2 = self.head_kernels or (self.patch_size // 4,) * 2
            if self.head_kernels and k1 * k2 != self.patch_size:
                raise ValueError(f"head_kernels {(k1, k2)} must multiply to the patch size {self.patch_size}")
            x = nn.relu(nn.Conv(self.reduce_dim, (3, 3), padding=[(1, 1)] * 2, dtype=self.dtype,
                                name="head_conv")(x))
            x = nn.relu(nn.ConvTranspose(self.reduce_dim // 2, (k1, k1), (k1, k1), padding="VALID",
                                         dtype=self.dtype, name="head_up1")(x))
            x = nn.ConvTranspose(1, (k2, k2), (k2, k2), padding="VALID", dtype=self.dtype, name="head_up2")(x)
        else:
            p = self.patch_size
            x = nn.ConvTranspose(1, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="head_up")(x)
        return x[..., 0].astype(jnp.float32)


def decoder_param_filter(path: tuple[str, ...]) -> bool:
    """True for parameters of the decoder (everything but the two CLIP towers): what a frozen run trains."""
    return path[0] not in ("vision", "text")

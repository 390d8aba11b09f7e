"""Vision Transformer encoder shared by CLIP (CLIPSeg) and MUMC.

One module, two flavours chosen by fields:
- CLIP ViT-B/16: `patch_bias=False, pre_norm=True, activation="quick_gelu", ln_eps=1e-5`, learned position
  embedding resized (torch-style bicubic) when the input grid differs from the trained one.
- timm/MUMC ViT-B/16: `patch_bias=True, pre_norm=False, activation="gelu", ln_eps=1e-6`, fixed 2-D sin-cos
  position embedding, MAE-style patch dropping (`keep_idx`: only kept tokens enter the encoder).
Input images are NHWC float; output tokens [B, 1 + N_kept, D] (class token first) and, if asked,
every block's output.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxboost.models import layers
from jaxboost.models.resize import resize_posemb_grid, torch_bicubic_matrix


def sincos_2d_posemb(grid: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """MAE's fixed 2-D sin-cos embedding [grid*grid, dim]: half the channels encode y, half x."""
    assert dim % 4 == 0, "sin-cos embedding needs dim divisible by 4"
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    def enc(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    # MAE order: first half from the w-grid (x), second from the h-grid (y).
    return np.concatenate([enc(xs), enc(ys)], axis=1).astype(np.float32)


def interpolate_pos_embed(table, new_grid: int, extra_tokens: int = 1) -> np.ndarray:
    """A position table [extra + g*g, D] moved to another patch grid as MUMC's and ALBEF's
    `interpolate_pos_embed` (models/vision/vit.py) does: the class/extra rows kept, the g x g patch rows
    resized bicubic with align_corners=False (torch's a=-0.75 kernel). The same table comes back when the
    grid already matches; a table whose patch rows are not a square grid raises."""
    table = np.asarray(table, np.float32)
    patches = table.shape[0] - extra_tokens
    grid = int(round(max(patches, 0) ** 0.5))
    if grid * grid != patches or grid == 0:
        raise ValueError(f"position table of {table.shape[0]} rows is not {extra_tokens} extra + a square grid")
    if grid == new_grid:
        return table
    # on the host in float64 (a one-off resize of a checkpoint; resize_posemb_grid is its in-graph twin)
    m = torch_bicubic_matrix(grid, new_grid).astype(np.float64)
    patches = np.einsum("ph,qw,hwd->pqd", m, m, table[extra_tokens:].reshape(grid, grid, -1).astype(np.float64))
    return np.concatenate([table[:extra_tokens], patches.reshape(new_grid * new_grid, -1).astype(np.float32)])


class Model(nn.Module):
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    image_size: int = 224           # the grid the learned position embedding is stored at
    activation: str = "gelu"
    ln_eps: float = 1e-6
    patch_bias: bool = True
    pre_norm: bool = False          # CLIP's ln_pre before the blocks
    final_norm: bool = True         # timm's norm / CLIP's ln_post on the output tokens (class token for CLIP)
    posemb: str = "learned"         # "learned" | "sincos2d"
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    remat: bool | str = False      # a remat policy name (layers.REMAT_POLICIES); True = "full"
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, images, keep_idx=None, output_hidden_states: bool = False, deterministic: bool = True):
        """images [B, H, W, C]; keep_idx [B, K] int (patches to keep, sorted) or None."""
        x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                    use_bias=self.patch_bias, dtype=self.dtype, name="patch_embed")(images)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        train_grid = self.image_size // self.patch_size
        if self.posemb == "sincos2d":
            cls_pos = jnp.zeros((1, d), x.dtype)
            patch_pos = jnp.asarray(sincos_2d_posemb(gh, d)) if gh == gw else None
            assert patch_pos is not None, "sin-cos embedding assumes a square grid"
        else:
            pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1 + train_grid ** 2, d))
            cls_pos, patch_pos = pos[:1], pos[1:]
            if (gh, gw) != (train_grid, train_grid):
                patch_pos = resize_posemb_grid(patch_pos, (train_grid, train_grid), (gh, gw))
        x = x + patch_pos[None].astype(x.dtype)
        if keep_idx is not None:
            x = jnp.take_along_axis(x, keep_idx[..., None], axis=1)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (d,))
        cls = jnp.broadcast_to((cls + cls_pos[0]).astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_pre")(x)
        block_cls = layers.remat(layers.PreNormBlock, self.remat, static_argnums=(3,))
        hidden = [x]
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, self.activation, self.ln_eps, self.dropout_rate,
                          self.attention_impl, self.dtype, name=f"block{i}")(x, None, deterministic)
            hidden.append(x)
        if self.final_norm:
            x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_post")(x)
        return (x, hidden) if output_hidden_states else x

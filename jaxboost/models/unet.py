"""A small U-Net segmenter: the foundation's proof model and the label-fidelity judge of SDM samples.

images [B, H, W, C] -> logits [B, H, W, num_classes]. GroupNorm + SiLU double convs, max-pool down,
transposed-conv up, skip concatenation.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class DoubleConv(nn.Module):
    features: int
    groups: int = 8

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.Conv(self.features, (3, 3), name=f"conv{i}")(x)
            x = nn.silu(nn.GroupNorm(min(self.groups, self.features), name=f"norm{i}")(x))
        return x


class Model(nn.Module):
    num_classes: int = 4
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, images, train: bool = False):
        skips, x = [], images
        for i, w in enumerate(self.widths[:-1]):
            x = DoubleConv(w, name=f"down{i}")(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = DoubleConv(self.widths[-1], name="bottleneck")(x)
        for i, w in reversed(list(enumerate(self.widths[:-1]))):
            x = nn.ConvTranspose(w, (2, 2), (2, 2), name=f"upsample{i}")(x)
            x = DoubleConv(w, name=f"up{i}")(jnp.concatenate([x, skips[i]], axis=-1))
        return nn.Conv(self.num_classes, (1, 1), name="head")(x)

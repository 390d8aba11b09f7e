"""Segmentation losses for one binary mask per sample: pure functions of logits and masks.

logits, masks: [B, H, W] (masks in {0, 1}, float). Per-sample terms are averaged over the batch.
`dice_bce` is the Synthetic Boost objective, Dice (weight 1) + binary cross-entropy. The public runs used
MONAI's DiceCELoss with one output channel, whose cross-entropy is a softmax over that single channel:
log_softmax of one logit is 0, so the term and its gradient were always 0 (MONAI #6923).
`ce_mode="original"` reproduces that term for comparison; the default "fixed" uses BCE with logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxboost.models.resize import resize_nearest


def sigmoid_dice_loss(logits, masks, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
    """MONAI DiceLoss(sigmoid=True) per sample: 1 - (2|P∩G| + nr) / (|P| + |G| + dr) -> [B]."""
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))
    masks = masks.astype(jnp.float32)
    axes = tuple(range(1, logits.ndim))
    intersection = jnp.sum(probs * masks, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(masks, axis=axes)
    return 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)


def bce_with_logits(logits, masks):
    """Mean binary cross-entropy with logits per sample -> [B] (torch BCEWithLogitsLoss per sample)."""
    per_pixel = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), masks.astype(jnp.float32))
    return per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)


def single_channel_softmax_ce(logits, masks):
    """The public code's cross-entropy: softmax CE over a channel axis of size 1 -> [B], identically 0."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)[:, None], axis=1)  # [B, 1, H, W], all 0
    per_pixel = -(masks.astype(jnp.float32)[:, None] * log_probs).sum(axis=1)
    return per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)


CE_TERMS = {"fixed": bce_with_logits, "original": single_channel_softmax_ce}


def dice_bce(logits, masks, dice_weight: float = 1.0, bce_weight: float = 0.2, ce_mode: str = "fixed"):
    """dice_weight * Dice + bce_weight * CE, batch mean -> (loss, {"dice": .., "ce": ..}).

    logits [B, h, w], masks [B, H, W]. Logits smaller than the masks (CRIS's H/4 map, model.upsample="none")
    are compared with the nearest-downsampled mask, as CRIS.pytorch trains."""
    if logits.shape != masks.shape and logits.ndim == masks.ndim == 3 and logits.shape[0] == masks.shape[0] \
            and all(a <= b for a, b in zip(logits.shape[1:], masks.shape[1:])):
        masks = resize_nearest(masks[..., None], logits.shape[1:])[..., 0]
    if logits.shape != masks.shape:
        raise ValueError(f"logits {logits.shape} and masks {masks.shape} must both be [B, H, W] (logits may be "
                         "smaller: the mask is then nearest-downsampled)")
    if ce_mode not in CE_TERMS:
        raise ValueError(f"ce_mode must be one of {sorted(CE_TERMS)}, got {ce_mode!r}")
    dice = sigmoid_dice_loss(logits, masks).mean()
    ce = CE_TERMS[ce_mode](logits, masks).mean()
    return dice_weight * dice + bce_weight * ce, {"dice": dice, "ce": ce}

"""Image-text matching (ITM) with hard negatives (ALBEF/MUMC `get_matching_loss`; Li et al. 2023).

For each text one negative image and for each image one negative text, drawn from softmax(in-batch
similarity / temp) + 1e-4 with the diagonal zeroed (the positive can never be drawn). The fusion encoder then
scores B positives and 2B negatives; the loss is 2-way cross-entropy with label 1 for the positives.
Sampling is a pure function of an rng key so the draw can be replayed (and compared with PyTorch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def hard_negative_weights(sim):
    """sim [B, B] (row i: query i vs in-batch candidates) -> sampling weights with the diagonal zeroed."""
    w = jax.nn.softmax(jax.lax.stop_gradient(sim).astype(jnp.float32), axis=-1) + 1e-4
    return w * (1.0 - jnp.eye(sim.shape[0], dtype=w.dtype))


def itm_hard_negatives(rng, image_feat, text_feat, temp):
    """-> (neg_image_idx [B] for each text, neg_text_idx [B] for each image), drawn without the positive.

    image_feat/text_feat [B, D] normalised (the global batch, so negatives may come from any device).
    """
    sim_i2t = image_feat @ text_feat.T / temp
    rng_img, rng_txt = jax.random.split(rng)
    w_t2i = hard_negative_weights(sim_i2t.T)
    w_i2t = hard_negative_weights(sim_i2t)
    neg_image_idx = jax.random.categorical(rng_img, jnp.log(w_t2i), axis=-1)
    neg_text_idx = jax.random.categorical(rng_txt, jnp.log(w_i2t), axis=-1)
    return neg_image_idx, neg_text_idx


def itm_loss(logits_pos, logits_neg):
    """logits_pos [B, 2] (matched pairs), logits_neg [2B, 2] (text+neg image, neg text+image) -> mean CE."""
    logits = jnp.concatenate([logits_pos, logits_neg], axis=0)
    labels = jnp.concatenate([jnp.ones(logits_pos.shape[0], jnp.int32),
                              jnp.zeros(logits_neg.shape[0], jnp.int32)])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

"""Image-text alignment (ITA) of MUMC: cross-modal contrastive loss with momentum distillation and a queue,
plus unimodal image-image and text-text terms (MUMC, Li et al. 2023).

All features are L2-normalised rows. Online features [B, D]; momentum features [B, D]; queues [Q, D].
Negatives span the global batch: call these under `jax.jit` on arrays sharded over the data axis (global
arrays), and XLA inserts the all-gather for `feat @ feat_all.T` itself, with gradient (the original gathers
only into the queue, without gradient). Inside `shard_map`, gather with `jax.lax.all_gather(x, axis,
tiled=True)` before calling.

Following MUMC's `get_contrastive_loss`: every term compares an online feature with the momentum features
[momentum batch; queue] of the other (or the same) modality; image-image pairs two independently masked
views (online vs momentum encoder), text-text the online and momentum text features. Targets: cross-modal
alpha * softmax(momentum sims) + (1 - alpha) * one-hot; unimodal one-hot. Momentum terms carry no gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cross_entropy(logits, targets):
    """mean_i -sum_j targets[i, j] log_softmax(logits)[i, j]; logits/targets [B, K]."""
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits, axis=-1) * targets, axis=-1))


def distilled_targets(sim_m, alpha):
    """alpha * softmax(momentum sims) + (1 - alpha) * one-hot on the first B columns; sim_m [B, B + Q]."""
    one_hot = jnp.eye(sim_m.shape[0], sim_m.shape[1], dtype=sim_m.dtype)
    return alpha * jax.nn.softmax(sim_m, axis=-1) + (1.0 - alpha) * one_hot


def ita_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha):
    """MUMC ITA = (L_i2t + L_t2i + 0.5 (L_i2i + L_t2t)) / 2.

    image_feat/text_feat [B, D] online; *_m [B, D] momentum; queues [Q, D]; temp scalar (already clamped).
    Returns (loss, {"i2t", "t2i", "i2i", "t2t"}).
    """
    sg = jax.lax.stop_gradient
    image_all = sg(jnp.concatenate([image_feat_m, image_queue], axis=0))   # [B + Q, D]
    text_all = sg(jnp.concatenate([text_feat_m, text_queue], axis=0))
    temp_m = sg(temp)
    targets_i2t = sg(distilled_targets(image_feat_m @ text_all.T / temp_m, alpha))
    targets_t2i = sg(distilled_targets(text_feat_m @ image_all.T / temp_m, alpha))
    one_hot = jnp.eye(image_feat.shape[0], image_all.shape[0], dtype=image_feat.dtype)
    terms = {
        "i2t": soft_cross_entropy(image_feat @ text_all.T / temp, targets_i2t),
        "t2i": soft_cross_entropy(text_feat @ image_all.T / temp, targets_t2i),
        "i2i": soft_cross_entropy(image_feat @ image_all.T / temp, one_hot),
        "t2t": soft_cross_entropy(text_feat @ text_all.T / temp, one_hot),
    }
    loss = (terms["i2t"] + terms["t2i"] + 0.5 * (terms["i2i"] + terms["t2t"])) / 2
    return loss, terms


def clamp_temperature(temp, low: float = 0.001, high: float = 0.5):
    """MUMC clamps the learnable temperature in place before each step; here on use (same forward value)."""
    return jnp.clip(temp, low, high)


def alpha_ramp(step, steps_per_epoch: int, alpha: float = 0.4, ramp_epochs: float = 2.0):
    """Distillation weight: linear from 0 to `alpha` over the first `ramp_epochs` epochs, then constant."""
    progress = jnp.asarray(step, jnp.float32) / max(1.0, steps_per_epoch * ramp_epochs)
    return alpha * jnp.minimum(1.0, progress)


def clip_loss(image_emb, text_emb, labels, logit_scale):
    """CLIP's symmetric cross-entropy of the scaled cosine similarities; targets spread evenly over the
    batch's pairs of the same structure (`labels`)."""
    image_emb = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
    text_emb = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
    logits = jnp.exp(logit_scale) * image_emb @ text_emb.T
    same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
    targets = same / same.sum(-1, keepdims=True)
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets))

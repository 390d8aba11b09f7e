"""MUMC's non-optimised state: the momentum (EMA) copies of the encoders and projections, the feature queues,
and the temperature clamp applied after each update (github.com/pengfeiliHEU/MUMC, ALBEF's model_pairs and
_dequeue_and_enqueue)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxboost.models.mumc import MOMENTUM_KEYS, _l2_normalize


def momentum_init(params):
    """The momentum copy: image encoder, BERT (with MLM head) and projections, as in MUMC's model_pairs."""
    return jax.tree_util.tree_map(jnp.array, {k: params[k] for k in MOMENTUM_KEYS})


def momentum_update(params, momentum_params, momentum: float = 0.995):
    """EMA: m <- momentum * m + (1 - momentum) * p on the momentum sub-tree (pure)."""
    return jax.tree_util.tree_map(lambda m, p: momentum * m + (1.0 - momentum) * p,
                                  momentum_params, {k: params[k] for k in momentum_params})


def init_queues(rng, size: int, dim: int):
    """Random unit-norm queues [size, dim] (as MUMC's normalised randn) and the write pointer."""
    r_img, r_txt = jax.random.split(rng)
    unit = lambda r: _l2_normalize(jax.random.normal(r, (size, dim), jnp.float32))
    return {"image": unit(r_img), "text": unit(r_txt), "ptr": jnp.zeros((), jnp.int32)}


def enqueue(queues, image_feat, text_feat):
    """Write the (global) momentum features [B, E] at ptr, advance ptr by B modulo the queue size."""
    size, b = queues["image"].shape[0], image_feat.shape[0]
    if size % b:
        raise ValueError(f"queue size {size} must be a multiple of the global batch {b}")
    ptr = queues["ptr"]
    write = lambda q, f: jax.lax.dynamic_update_slice(q, jax.lax.stop_gradient(f).astype(q.dtype), (ptr, 0))
    return {"image": write(queues["image"], image_feat), "text": write(queues["text"], text_feat),
            "ptr": (ptr + b) % size}


def clamp_params(params, low: float = 0.001, high: float = 0.5):
    """MUMC clamps the temperature parameter in place each step; call after the optimizer update so the
    parameter itself (not only its use) stays in [low, high] and its gradient never dies at the bound."""
    return dict(params, temp=jnp.clip(params["temp"], low, high))

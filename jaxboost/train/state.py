"""The training state every task checkpoints, and the one EMA used for it (SDM's EMA, MUMC's momentum
encoders)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None   # SDM: the EMA copy that samples (improved-diffusion keeps one)
    # Non-optimised task state, by task: CRIS BatchNorm statistics {"batch_stats"}, MUMC pretraining
    # {"momentum", "queues"}, MUMC VQA {"momentum"}. (Named `extra` in the checkpoints already written.)
    extra: Any = None


def initial_state(params, tx: optax.GradientTransformation, rng_seed: int, *, ema: bool = False,
                  extra=None) -> TrainState:
    """Step 0: the optimiser's initial state; the EMA (when kept) starts as a copy of the params."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(rng_seed), ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                      extra=extra)


def ema_update(ema, params, decay):
    """ema * decay + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, ema, params)

"""The Task interface: what a trainer (`train/<task>.py`) builds and `loop.fit` runs.

A trainer module exposes `make_task(config, workdir) -> Task` and `open_task(config, workdir) -> Task` (the
same task without its training data, for `jaxboost eval`, synth and init_from). A Task holds:
  - the run length, resolved once at start-up (epochs -> steps; the config itself is never changed),
  - `init_state() -> TrainState` (pure; `fit` traces it with `jax.eval_shape` and creates it sharded); with
    `host_variables`, `init_state(variables)` builds the state from those placed variables,
  - the loss `loss_fn(params, state, batch, rng) -> (loss, (metrics, aux))` and an optional
    `post_update(old_state, new_state, aux) -> (new_state, metrics)` run after the optimiser update (EMA,
    momentum encoders, queues, BatchNorm statistics): `make_train_step` turns them into the one step,
  - a checkpointable host iterator factory and `prepare_batch` (host-side tokenization),
  - an optional `evaluate(state, split) -> {name: float}` over an `evaluator.BatchMapper` (compiled once per
    run); `fit` calls it on `eval_split`, `jaxboost eval` on the split asked for.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from jaxboost import parallel
from jaxboost.train import accumulate
from jaxboost.train.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config: ConfigDict, field: str = "model.dtype"):
    """The models' compute dtype, one convention for every config: `model.dtype` ("float32" | "bfloat16")."""
    node = config
    for part in field.split(".")[:-1]:
        node = node.get(part, {})
    name = node.get(field.split(".")[-1], "float32") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.{field}={name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RunLength:
    total_steps: int
    steps_per_epoch: int = 1
    eval_every: int = 0
    ckpt_every: int = 0

    @classmethod
    def from_config(cls, config: ConfigDict, steps_per_epoch: int = 1, per_epoch_default: bool = False):
        """`total_steps`, else `epochs` (or `num_epochs`) x steps_per_epoch; eval/ckpt every epoch when
        `per_epoch_default` and the config leaves them 0."""
        epochs = config.get("epochs", config.get("num_epochs", 0)) or 0
        total = int(config.get("total_steps", 0) or int(epochs) * steps_per_epoch)
        if total <= 0:
            raise ValueError(f"config.total_steps={config.get('total_steps', 0)} (epochs={epochs}): a run needs "
                             f"at least one step")
        fallback = steps_per_epoch if per_epoch_default else 0
        return cls(total, steps_per_epoch, int(config.get("eval_every", 0) or fallback),
                   int(config.get("ckpt_every", 0) or fallback))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    config: ConfigDict
    mesh: Mesh
    length: RunLength
    tx: optax.GradientTransformation
    init_state: Callable[[], TrainState]
    loss_fn: Callable
    post_update: Callable | None = None
    train_loader: Callable[[], Iterator] | None = None
    prepare_batch: Callable[[dict], dict] | None = None
    evaluate: Callable[[TrainState, str], dict] | None = None   # (state, split) -> {name: float}
    eval_split: str = "val"                                      # what `fit` evaluates every eval_every
    # Host-side initial variables (numpy, e.g. converted weights): `fit` places them on the mesh and passes
    # them to `init_state(variables)` as an argument, so they are never baked into the program as constants.
    host_variables: Callable[[], Any] | None = None
    info: dict = dataclasses.field(default_factory=dict)   # resolved values recorded in the run's meta
    model: Any = None
    tokenizer: Any = None

    @property
    def step_fn(self):
        return make_train_step(self.loss_fn, self.tx, self.post_update,
                               int(self.config.get("microbatches", 1) or 1))

    def abstract_state(self):
        return jax.eval_shape(self.init_state)

    def create_state(self, shardings=None) -> TrainState:
        """The initial state, created already sharded (`shardings`: a tree like the state's; None: default
        device); host variables enter as placed arguments."""
        init = jax.jit(self.init_state, out_shardings=shardings)
        if self.host_variables is None:
            return init()
        variables = self.host_variables()
        if shardings is None:
            return init(jax.tree.map(jnp.asarray, variables))
        # Placed on the mesh the caller's shardings name (a caller may build the state for another mesh).
        mesh = next((s.mesh for s in jax.tree.leaves(shardings) if hasattr(s, "mesh")), self.mesh)
        placement = parallel.shardings_for(jax.eval_shape(lambda: variables), mesh)
        return init(jax.tree.map(lambda v, s: jax.make_array_from_callback(np.shape(v), s,
                                                                          lambda i, v=v: np.asarray(v)[i]),
                                 variables, placement))


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, post_update: Callable | None = None,
                    microbatches: int = 1):
    """The one train step: grads of `loss_fn` (accumulated over `microbatches` micro-batches of the batch,
    `accumulate.value_and_grad`), the optax update, then `post_update` (if any)."""
    grad_fn = accumulate.value_and_grad(loss_fn, microbatches)

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, aux)), grads = grad_fn(state.params, state, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
        if post_update is not None:
            new, extra_metrics = post_update(state, new, aux)
            metrics = {**metrics, **extra_metrics}
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       lr_scale=opt_state.hyperparams["lr_scale"])
        return new, metrics

    return step_fn


def keep_model_state(old: TrainState, new: TrainState, aux):
    """post_update for models with mutable collections (BatchNorm statistics): the loss returns them."""
    return (new.replace(extra=aux) if aux is not None else new), {}

"""Gradient accumulation: one optimiser step over K micro-batches of the step's batch (`config.microbatches`).

The batch's leading axis B is split into K micro-batches of B/K examples, run one after another under
`lax.scan`, and their gradients, losses and metrics averaged: for a loss that is a mean over examples this
is the one-batch gradient (to float32 rounding), with the activations of B/K examples alive instead of B.
Losses that couple the examples of a batch (contrastive losses' in-batch negatives, BatchNorm statistics)
see B/K examples at a time, as with gradient accumulation in any framework.

Micro-batch i takes examples i, K + i, 2K + i, ... (a strided split): with the batch sharded in contiguous
blocks over the devices, every micro-batch then keeps an equal share on every device.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def split(batch, microbatches: int):
    """[B, ...] leaves -> [K, B/K, ...]; micro-batch i is examples i, K + i, ... (see the module docstring)."""
    def one(x):
        if x.shape[0] % microbatches:
            raise ValueError(f"config.microbatches={microbatches} does not divide the batch of {x.shape[0]}")
        x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(one, batch)


def merge(stacked):
    """The inverse of `split`: [K, B/K, ...] -> [B, ...] in the batch's own order."""
    def one(x):
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
    return jax.tree.map(one, stacked)


def _per_example(loss_fn: Callable, params, state, micro, rng, aux_leaves) -> list[bool]:
    """Which leaves of the loss's aux have one row per example: those whose leading dim follows the batch
    size (found by tracing the loss's shapes at a second micro-batch size). They are concatenated over the
    micro-batches (MUMC's queue features); the rest (momentum trees, BatchNorm statistics) are taken from
    the last micro-batch."""
    b = jax.tree.leaves(micro)[0].shape[0]
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2 * b,) + x.shape[1:], x.dtype), micro)
    doubled = jax.eval_shape(lambda p, bt, r: loss_fn(p, state, bt, r)[1][1], params, batch, rng)
    return [bool(a.shape) and a.shape != d.shape for a, d in zip(aux_leaves, jax.tree.leaves(doubled))]


def value_and_grad(loss_fn: Callable, microbatches: int) -> Callable:
    """`jax.value_and_grad(loss_fn, has_aux=True)` over `microbatches` micro-batches of the batch: the same
    signature and outputs ((loss, (metrics, aux)), grads), loss, metrics and grads averaged over the
    micro-batches, aux as `_per_example` says."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        return grad_fn

    def accumulated(params, state, batch, rng):
        micro = split(batch, microbatches)
        first = jax.tree.map(lambda x: x[0], micro)
        loss0, (metrics0, aux0) = jax.eval_shape(lambda p, bt, r: loss_fn(p, state, bt, r), params, first, rng)
        aux_leaves, aux_def = jax.tree.flatten(aux0)
        rows_mask = _per_example(loss_fn, params, state, first, rng, aux_leaves) if aux_leaves else []
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731

        def body(carry, inputs):
            loss_sum, metrics_sum, _, grads_sum = carry
            i, mb = inputs
            (loss, (metrics, aux)), grads = grad_fn(params, state, mb, jax.random.fold_in(rng, i))
            leaves = jax.tree.leaves(aux)
            shared = [a for a, row in zip(leaves, rows_mask) if not row]
            rows = [a for a, row in zip(leaves, rows_mask) if row]
            return (loss_sum + loss, jax.tree.map(jnp.add, metrics_sum, metrics), shared,
                    jax.tree.map(jnp.add, grads_sum, grads)), rows

        shared0 = [zeros(a) for a, row in zip(aux_leaves, rows_mask) if not row]
        init = (zeros(loss0), zeros(metrics0), shared0, jax.tree.map(jnp.zeros_like, params))
        (loss, metrics, shared, grads), rows = jax.lax.scan(body, init, (jnp.arange(microbatches), micro))
        rows, shared = iter(merge(rows)), iter(shared)
        aux = jax.tree.unflatten(aux_def, [next(rows) if row else next(shared) for row in rows_mask])
        mean = lambda x: x / microbatches  # noqa: E731
        return (mean(loss), (jax.tree.map(mean, metrics), aux)), jax.tree.map(mean, grads)

    return accumulated

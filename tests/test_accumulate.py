"""Gradient accumulation (`config.microbatches`): the same step as one batch for a mean-over-examples loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxboost.train import accumulate
from jaxboost.train.state import initial_state
from jaxboost.train.task import make_train_step


def _linear_loss(params, state, batch, rng):
    pred = batch["x"] @ params["w"] + params["b"]
    err = (pred - batch["y"]) ** 2
    # aux: one row per example (like MUMC's queue features) and one batch-independent tree (a momentum copy)
    aux = {"rows": pred, "shared": jax.tree.map(lambda p: 0.5 * p, params)}
    return err.mean(), ({"mse": err.mean(), "max_pred": pred.max()}, aux)


def _batch(n=12, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)}


def _tx(lr=1e-2):
    """An optimiser with the `lr_scale` hyperparameter the step logs (as optim.make_optimizer builds)."""
    return optax.inject_hyperparams(lambda lr_scale: optax.adam(lr * lr_scale))(lr_scale=1.0)


def _state(tx, d=5):
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(d, 3)), jnp.float32), "b": jnp.zeros((3,))}
    return initial_state(params, tx, 0)


def test_split_merge_roundtrip_and_strided_order():
    x = jnp.arange(12).reshape(12, 1)
    micro = accumulate.split({"x": x}, 3)["x"]
    assert micro.shape == (3, 4, 1)
    np.testing.assert_array_equal(micro[1, :, 0], [1, 4, 7, 10])   # example i, K + i, ...: spread over devices
    np.testing.assert_array_equal(accumulate.merge(micro), x)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_accumulated_step_equals_one_batch_step(k):
    tx = _tx()
    batch = _batch()
    one = jax.jit(make_train_step(_linear_loss, tx))(_state(tx), batch)
    many = jax.jit(make_train_step(_linear_loss, tx, microbatches=k))(_state(tx), batch)
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(many[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name in ("loss", "mse", "grad_norm"):
        np.testing.assert_allclose(one[1][name], many[1][name], rtol=1e-5)


def test_aux_rows_concatenated_shared_kept():
    batch = _batch()
    params = _state(_tx()).params
    rng = jax.random.PRNGKey(0)
    (_, (_, aux1)), _ = accumulate.value_and_grad(_linear_loss, 1)(params, None, batch, rng)
    (_, (_, aux3)), _ = jax.jit(accumulate.value_and_grad(_linear_loss, 3))(params, None, batch, rng)
    np.testing.assert_allclose(aux3["rows"], aux1["rows"], rtol=1e-5, atol=1e-6)   # every example's row, in batch order
    for a, b in zip(jax.tree.leaves(aux1["shared"]), jax.tree.leaves(aux3["shared"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_microbatches_must_divide_the_batch():
    tx = _tx()
    with pytest.raises(ValueError, match="config.microbatches=5"):
        jax.jit(make_train_step(_linear_loss, tx, microbatches=5))(_state(tx), _batch())


def test_split_keeps_every_micro_batch_on_every_device():
    """The strided split of a data-sharded batch is local: micro-batch axis unsharded, no collectives."""
    from jaxboost import parallel
    mesh = parallel.make_mesh(8, 1, jax.devices()[:8])
    x = jax.device_put(jnp.arange(32 * 3.0).reshape(32, 3), parallel.batch_sharding(mesh, 2))
    split = jax.jit(lambda b: accumulate.split(b, 2))
    assert tuple(split(x).sharding.spec)[:2] == (None, "data")
    hlo = split.lower(x).compile().as_text()
    assert not any(op in hlo for op in ("all-to-all", "collective-permute", "all-gather"))


def test_the_loop_takes_microbatches_from_the_config(tmp_path):
    """Task.step_fn reads config.microbatches: a run of the toy task accumulates over 2 micro-batches, and
    3 (not dividing its batch of 8) is named."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import toy_task
    config = toy_task.make_config(4, ckpt_every=0, async_checkpointing=False)
    config.microbatches = 2
    state, summary = toy_task.run(str(tmp_path / "two"), config)
    assert summary["final_step"] == 4 and np.isfinite(summary["last_train"]["loss"])
    config.microbatches = 3
    with pytest.raises(ValueError, match="config.microbatches=3 does not divide the batch of 8"):
        toy_task.run(str(tmp_path / "three"), config)

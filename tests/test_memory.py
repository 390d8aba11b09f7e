"""Remat policies and the AOT memory benchmark.

Remat must not change what a model computes (gradients equal to the un-rematerialised ones for every named
policy) and must lower the compiled train step's peak; the benchmark's JSON rows carry XLA's figures.
The full-size table is `python -m benchmarks.memory --json OUT` (minutes per config): here a tiny config.
XLA:CPU's compiled peak does not change with remat (its buffer assignment keeps every activation), so
the remat check is on the saved residuals of the loss's backward pass."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import memory
from jaxboost.models import bert, layers, sdm, vit

POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _grads(model, args, rng=0):
    params = model.init(jax.random.PRNGKey(rng), *args)["params"]
    loss = lambda p: jnp.sum(jnp.square(model.apply({"params": p}, *args).astype(jnp.float32)))
    return jax.grad(loss)(params)


def _assert_same_grads(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_remat_policies_leave_vit_and_bert_gradients_unchanged(policy):
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    kw = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=16)
    _assert_same_grads(_grads(vit.Model(**kw, remat=policy), (images,)), _grads(vit.Model(**kw), (images,)))
    ids, mask = jnp.array([[5, 6, 7, 0]]), jnp.array([[1, 1, 1, 0]])
    tokens = jax.random.normal(jax.random.PRNGKey(2), (1, 3, 32))
    kw = dict(vocab_size=20, hidden=32, depth=2, num_heads=2, mlp_dim=64, max_position=8, fusion_layer=1,
              mlm_head=False)
    _assert_same_grads(_grads(bert.Model(**kw, remat=policy), (ids, mask, tokens)),
                       _grads(bert.Model(**kw), (ids, mask, tokens)))


def test_remat_policy_names_resolve_and_an_unknown_one_is_named():
    assert layers.remat(vit.Model, "none") is vit.Model and layers.remat(vit.Model, False) is vit.Model
    assert layers.remat_policy_name(True) == "full"
    assert set(POLICIES) <= set(layers.REMAT_POLICIES.names())
    with pytest.raises(ValueError, match="remat policy 'dots'"):
        layers.remat(vit.Model, "dots")


def test_spade_modulation_runs_in_float32_in_a_bfloat16_model():
    """out = GN(x) * (1 + gamma) + beta with gamma/beta from the bf16 convs: the product and sum in float32,
    rounded once to bf16 (a bf16 modulation rounds GN(x), 1 + gamma and the product: errors of several ulps)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 64)).astype(jnp.bfloat16) * 3
    labels = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(1), (2, 8, 8), 0, 5), 5)
    module = sdm.SpadeGroupNorm(jnp.bfloat16, hidden=16)
    params = module.init(jax.random.PRNGKey(2), x, labels)
    params = jax.tree.map(lambda p: p * 20, params)    # gammas/betas of order 1, so the rounding shows
    out, inter = module.apply(params, x, labels, capture_intermediates=True)
    got = lambda name: np.asarray(inter["intermediates"][name]["__call__"][0], np.float64)
    want = got("norm") * (1 + got("mlp_gamma")) + got("mlp_beta")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want.astype(np.float32).astype(jnp.bfloat16),
                                                                          np.float32))


@pytest.fixture(scope="module")
def tiny_rows():
    """The tiny SDM's train step compiled for 8 devices without and with remat (two XLA compiles)."""
    assert jax.device_count() >= 8, "conftest sets 8 simulated devices"
    devices = jax.devices()[:8]
    return [memory.compile_row("sdm.py:tiny", devices, overrides={"remat_policy": policy})
            for policy in ("none", "full")]


@pytest.mark.slow
def test_memory_rows_report_compiled_peaks_and_remat_lowers_the_sdm_peak(tiny_rows, tmp_path):
    none, full = tiny_rows
    for row in tiny_rows:
        assert row["devices"] == 8 and row["mesh"] == "data=8,fsdp=1" and row["batch"] == 8
        # XLA's argument buffers are the TrainState (params, Adam mu/nu, EMA: replicated here) + the batch.
        state = row["params_bytes"] + row["optimizer_bytes"] + row["ema_bytes"]
        assert row["ema_bytes"] == row["params_bytes"] > 0
        assert state <= row["argument_bytes"] < state + 2 ** 20
        assert row["peak_bytes_per_device"] == (row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
                                                - row["alias_bytes"])
        assert row["alias_bytes"] >= state - 2 ** 16     # the donated TrainState is updated in place
        assert row["fits"] is True
    assert none["remat_policy"] == "none" and full["remat_policy"] == "full"
    # Remat keeps each block's inputs only: most saved activations go (the tiny U-Net: ~1/5 stay).
    assert none["saved_activation_bytes"] == none["saved_activation_bytes_without_remat"] == \
        full["saved_activation_bytes_without_remat"]
    assert full["saved_activation_bytes"] < 0.5 * none["saved_activation_bytes"]
    # XLA:CPU's buffer assignment keeps them all either way (same temporaries); the estimate takes them off.
    assert none["estimated_peak_bytes"] == none["peak_bytes_per_device"]
    assert full["estimated_peak_bytes"] == max(
        full["peak_bytes_per_device"] - (none["saved_activation_bytes"] - full["saved_activation_bytes"]),
        full["argument_bytes"] + full["output_bytes"] - full["alias_bytes"] + full["saved_activation_bytes"]
        + full["params_bytes"])
    assert full["estimated_peak_bytes"] < none["estimated_peak_bytes"]
    path = tmp_path / "memory.json"
    memory.write_rows(path, [none])
    written = memory.write_rows(path, [full, dict(none, compile_s=0.0)])   # a re-run replaces its own row
    assert [r["remat_policy"] for r in json.loads(path.read_text())] == ["none", "full"] == \
        [r["remat_policy"] for r in written]
    assert "| sdm.py:tiny | train | 8 | data=8,fsdp=1 | 8 | full |" in memory.peak_table(written)


@pytest.mark.slow
def test_microbatches_halve_the_activations_of_the_same_batch(tiny_rows):
    """config.microbatches=2 at twice the batch: the step's temporaries are those of one micro-batch (about
    the K=1 step at half the batch), the saved activations are one micro-batch's, and the row says so."""
    one = tiny_rows[1]   # remat full, batch 8
    two = memory.compile_row("sdm.py:tiny", jax.devices()[:8],
                             overrides={"remat_policy": "full", "batch_size": 16, "microbatches": 2})
    assert two["microbatches"] == 2 and two["batch"] == 16 and two["per_device_batch"] == 2
    assert two["saved_activation_bytes"] == one["saved_activation_bytes"]
    assert two["temp_bytes"] < 1.3 * one["temp_bytes"]
    assert "| sdm.py:tiny | train | 8 | data=8,fsdp=1 | 16 (2 x 8) | full |" in memory.peak_table([two])

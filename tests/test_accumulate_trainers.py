"""config.microbatches with the trainers' own losses and post-updates: the SDM's EMA and MUMC's momentum
model and queues (its per-example features are enqueued for the whole batch, in the batch's order)."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxboost.config import load_config
from jaxboost.data.tokenize_bert import BertTokenizer
from jaxboost.train import mumc_pretrain, optim, sdm
from jaxboost.train.task import make_train_step

SDM_SMALL = ["model.model_channels=32", "model.channel_mult=(1,1)", "model.attention_resolutions=(8,)",
             "model.num_head_channels=32", "model.spade_hidden=8", "model.image_size=16", "data.size=16",
             "batch_size=4"]


def _steps(config, loss_fn, post_update, tx, init_fn, batch, ks=(1, 2)):
    out = {}
    for k in ks:
        state = jax.jit(init_fn)()
        out[k] = jax.device_get(jax.jit(make_train_step(loss_fn, tx, post_update, k))(state, batch))
    return out


def test_sdm_step_with_microbatches_updates_params_and_ema():
    config = load_config("configs/sdm.py:tiny", SDM_SMALL)
    model = sdm.build_model(config)
    tx = optim.make_optimizer(config, 10)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32),
             "labels": rng.integers(0, 5, (4, 16, 16)).astype(np.int32)}
    out = _steps(config, sdm.make_loss_fn(model, config, sdm.make_schedule(config)),
                 sdm.ema_post_update(float(config.ema_decay)), tx, sdm.make_init_fn(model, config, tx), batch)
    init = jax.device_get(jax.jit(sdm.make_init_fn(model, config, tx))())
    (state1, m1), (state2, m2) = out[1], out[2]
    assert int(state2.step) == 1 and np.isfinite(m2["loss"]) and float(m2["grad_norm"]) > 0
    decay = float(m2["ema_decay"])
    trees = (init.params, state2.params, state2.ema_params)
    for p0, p, e in zip(*(jax.tree.leaves(t) for t in trees)):
        np.testing.assert_allclose(e, decay * p0 + (1 - decay) * p, rtol=1e-5, atol=1e-6)
    # the same magnitude of loss as the one-batch step (other noise draws: not equal)
    assert 0.2 < float(m2["loss"]) / float(m1["loss"]) < 5


def test_mumc_pretrain_step_with_microbatches_enqueues_the_whole_batch(tmp_path):
    config = load_config("configs/mumc_pretrain.py:tiny", [
        "model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1", "model.vision_width=32",
        "model.text_width=32", "model.vision_mlp_dim=64", "model.text_mlp_dim=64", "model.vision_heads=2",
        "model.text_heads=2", "batch_size=8", "model.embed_dim=16", "queue_size=16", "model.patch_size=8",
        "patch_drop=0.0"])  # no patch masking: the momentum features are then draw-free
    tokenizer = BertTokenizer.train(["the left ventricle", "the left atrium in a four chamber view"],
                                    str(tmp_path / "tok"), 120)
    model = mumc_pretrain.build_model(config, tokenizer.vocab_size)
    tx = optim.make_optimizer(config, 10, 10)
    s, length = int(config.model.image_size), int(config.data.max_tokens)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, tokenizer.vocab_size, (8, length)).astype(np.int32)
    batch = {"images": jnp.asarray(rng.normal(size=(8, s, s, 3)), jnp.float32), "input_ids": ids,
             "mask": np.ones((8, length), np.int32)}
    out = _steps(config, mumc_pretrain.make_loss_fn(config, model, tokenizer, 10),
                 mumc_pretrain.momentum_post_update(config), tx, mumc_pretrain.make_init_fn(config, model, tx), batch)
    (state1, _), (state2, m2) = out[1], out[2]
    assert np.isfinite(m2["loss"])
    q1, q2 = state1.extra["queues"], state2.extra["queues"]
    assert int(q1["ptr"]) == int(q2["ptr"]) == 8
    # the momentum features (pre-step EMA model, no masking) do not depend on the split: same queue, same order
    for a, b in zip(jax.tree.leaves(q1), jax.tree.leaves(q2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state1.extra["momentum"]), jax.tree.leaves(state2.extra["momentum"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

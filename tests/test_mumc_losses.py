"""MUMC losses vs the PyTorch reference (benchmarks/torch_ref/mumc.py, following MUMC's code): values and
gradients on the same random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.torch_ref import mumc as ref
from jaxboost.losses import contrastive, matching, mlm


def _unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_ita_loss_matches_torch_values_and_gradients(rng, alpha):
    b, q, d = 6, 16, 8
    arrays = [_unit(rng, b, d) for _ in range(4)] + [_unit(rng, q, d), _unit(rng, q, d)]
    temp = np.float32(0.07)

    t_in = [torch.tensor(a, requires_grad=i < 2) for i, a in enumerate(arrays)]
    t_temp = torch.tensor(temp, requires_grad=True)
    t_loss, t_terms = ref.ita_loss(*t_in[:4], t_in[4].t(), t_in[5].t(), t_temp, alpha)
    t_loss.backward()

    def f(img, txt, tmp):
        return contrastive.ita_loss(img, txt, *map(jnp.asarray, arrays[2:]), tmp, alpha)

    (loss, terms), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(arrays[0]), jnp.asarray(arrays[1]), jnp.asarray(temp))
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5, atol=1e-5)
    for k in ("i2t", "t2i", "i2i", "t2t"):
        np.testing.assert_allclose(float(terms[k]), t_terms[k].item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], t_in[0].grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(grads[1], t_in[1].grad.numpy(), atol=1e-5)
    # torch: targets computed under no_grad with the same temp tensor -> gradient only through the online sims
    np.testing.assert_allclose(float(grads[2]), t_temp.grad.item(), rtol=1e-4)


def test_itm_loss_matches_torch(rng):
    b = 5
    pos = rng.standard_normal((b, 2)).astype(np.float32)
    neg = rng.standard_normal((2 * b, 2)).astype(np.float32)
    tp, tn = torch.tensor(pos, requires_grad=True), torch.tensor(neg, requires_grad=True)
    t_loss = ref.itm_loss(tp, tn, torch.nn.Identity())
    t_loss.backward()
    loss, (gp, gn) = jax.value_and_grad(matching.itm_loss, argnums=(0, 1))(jnp.asarray(pos), jnp.asarray(neg))
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gp, tp.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(gn, tn.grad.numpy(), atol=1e-6)


def test_itm_hard_negatives_follow_torch_weights_and_never_pick_positive(rng):
    b, d = 6, 8
    img, txt = _unit(rng, b, d), _unit(rng, b, d)
    temp = 0.2
    w_i2t, w_t2i = ref.itm_negative_weights(torch.tensor(img), torch.tensor(txt), temp)
    sim = jnp.asarray(img) @ jnp.asarray(txt).T / temp
    np.testing.assert_allclose(matching.hard_negative_weights(sim), w_i2t.numpy(), atol=1e-6)
    np.testing.assert_allclose(matching.hard_negative_weights(sim.T), w_t2i.numpy(), atol=1e-6)

    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    neg_img, neg_txt = jax.vmap(lambda k: matching.itm_hard_negatives(k, img, txt, temp))(keys)
    assert not np.any(np.asarray(neg_img) == np.arange(b)) and not np.any(np.asarray(neg_txt) == np.arange(b))
    freq = np.stack([np.bincount(np.asarray(neg_txt)[:, i], minlength=b) / n for i in range(b)])
    expected = (w_i2t / w_i2t.sum(1, keepdim=True)).numpy()
    np.testing.assert_allclose(freq, expected, atol=0.04)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_distill_loss_matches_torch(rng, alpha):
    b, length, v = 3, 7, 11
    logits = rng.standard_normal((b, length, v)).astype(np.float32)
    logits_m = rng.standard_normal((b, length, v)).astype(np.float32)
    ids = rng.integers(0, v, (b, length))
    picked = rng.random((b, length)) < 0.4
    picked[0, 0] = True
    labels = np.where(picked, ids, -100)
    tl = torch.tensor(logits, requires_grad=True)
    t_loss = ref.mlm_distill_loss(tl, torch.tensor(logits_m), torch.tensor(labels), alpha)
    t_loss.backward()
    loss, g = jax.value_and_grad(mlm.mlm_distill_loss)(jnp.asarray(logits), jnp.asarray(logits_m),
                                                       jnp.asarray(ids), jnp.asarray(picked), alpha)
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, tl.grad.numpy(), atol=1e-6)


def test_mask_tokens_80_10_10_and_never_special():
    vocab, mask_id, pad, cls, sep = 1000, 3, 0, 1, 2
    rng = np.random.default_rng(0)
    ids = rng.integers(10, vocab, (64, 128))
    ids[:, 0], ids[:, 100], ids[:, 101:] = cls, sep, pad
    masked, picked = mlm.mask_tokens(jax.random.PRNGKey(1), jnp.asarray(ids), vocab, mask_id, (pad, cls, sep))
    masked, picked = np.asarray(masked), np.asarray(picked)
    special = np.isin(ids, [pad, cls, sep])
    assert not picked[special].any() and np.array_equal(masked[special], ids[special])
    assert np.array_equal(masked[~picked], ids[~picked])
    assert abs(picked[~special].mean() - 0.15) < 0.01
    p = masked[picked]
    o = ids[picked]
    frac_mask = np.mean(p == mask_id)
    frac_kept = np.mean(p == o)
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_kept - 0.1) < 0.03


def test_alpha_ramp_linear_over_two_epochs():
    assert float(contrastive.alpha_ramp(0, 100)) == 0.0
    np.testing.assert_allclose(float(contrastive.alpha_ramp(50, 100)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(contrastive.alpha_ramp(200, 100)), 0.4, rtol=1e-6)
    np.testing.assert_allclose(float(contrastive.alpha_ramp(10_000, 100)), 0.4, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_answer_lm_loss_matches_torch_per_answer(rng, alpha):
    n, length, v = 4, 6, 13
    logits = rng.standard_normal((n, length, v)).astype(np.float32)
    logits_m = rng.standard_normal((n, length, v)).astype(np.float32)
    ids = rng.integers(4, v, (n, length))
    mask = np.ones((n, length), np.int64)
    mask[1, 3:], mask[2, 4:] = 0, 0
    ids[mask == 0] = 0
    labels = np.where(mask == 1, ids, -100)
    tl = torch.tensor(logits, requires_grad=True)
    want = ref.answer_lm_loss(tl, torch.tensor(logits_m[:, :-1]), torch.tensor(labels), alpha)
    want.sum().backward()
    f = lambda x: mlm.answer_lm_loss(x, jnp.asarray(logits_m), jnp.asarray(ids), jnp.asarray(mask), alpha)
    got = f(jnp.asarray(logits))
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda x: f(x).sum())(jnp.asarray(logits)), tl.grad.numpy(), atol=1e-6)

"""Attention: implementation per backend, float32 logits in bf16 runs, dropout on the einsum path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxboost.models import layers


def _qkv(dtype, lq=8, lk=8, heads=2, dh=16):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return [jax.random.normal(k, (2, n, heads, dh)).astype(dtype) for k, n in zip(keys, (lq, lk, lk))]


def _reference(q, k, v, mask=None):
    """float64 numpy attention on the operands' own (already rounded) values."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v), logits


def test_bf16_attention_logits_are_float32_products_of_the_bf16_operands():
    q, k, _ = _qkv(jnp.bfloat16)
    logits = layers.attention_logits(q, k)
    assert logits.dtype == jnp.float32
    _, want = _reference(q, k, k)
    # float32 accumulation of exact bf16 x bf16 products: ~1e-6 relative. A bf16 QK^T (or bf16 q * scale)
    # rounds to 8 bits: errors of ~1e-2 at these magnitudes.
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "einsum", "xla"])
def test_cpu_attention_matches_reference_with_a_padding_mask(impl):
    q, k, v = _qkv(jnp.float32, lq=5, lk=7)
    mask = np.ones((2, 1, 5, 7), bool)
    mask[1, ..., 4:] = False
    out = layers.dot_product_attention(q, k, v, mask=jnp.asarray(mask), implementation=impl)
    want, _ = _reference(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_auto_picks_cudnn_on_gpu_tpu_flash_on_tpu_and_einsum_otherwise(monkeypatch):
    bf, f32 = _qkv(jnp.bfloat16, 128, 256), _qkv(jnp.float32, 128, 256)
    short = _qkv(jnp.bfloat16, 77, 77)
    choose = lambda backend, qkv, **kw: layers.choose_attention("auto", qkv[0], qkv[1], backend=backend, **kw)
    assert choose("gpu", bf) == "cudnn" and choose("gpu", short) == "cudnn"
    assert choose("gpu", f32) == "einsum"                       # cuDNN's flash kernel takes half precision
    assert choose("gpu", bf, dropout=True) == "einsum"          # dropout: the explicit path
    monkeypatch.setattr(layers, "tpu_flash_available", lambda: True)
    assert choose("tpu", bf) == "tpu_flash" and choose("tpu", f32) == "tpu_flash"
    assert choose("tpu", short) == "einsum"                     # 77 tokens do not tile by 128
    assert choose("cpu", bf) == "einsum"
    assert layers.choose_attention("xla", *bf[:2], backend="gpu") == "xla"   # explicit names are kept
    # The module consults the backend: on a (pretended) GPU a bf16 MultiHeadAttention asks for cuDNN.
    monkeypatch.setattr(layers, "current_backend", lambda: "gpu")
    asked = []
    monkeypatch.setitem(layers.ATTENTION._table, "cudnn", lambda q, k, v, mask=None, bias=None:
                        asked.append(q.dtype) or layers.einsum_attention(q, k, v, mask, bias))
    x = jnp.ones((1, 4, 32), jnp.bfloat16)
    mha = layers.MultiHeadAttention(2, dtype=jnp.bfloat16)
    mha.apply(mha.init(jax.random.PRNGKey(0), x), x)
    assert asked == [jnp.bfloat16] * 2    # init and apply


def test_attention_dropout_drops_float32_probabilities_and_is_off_when_deterministic():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
    mha = layers.MultiHeadAttention(2, dropout_rate=0.5)
    params = mha.init(jax.random.PRNGKey(1), x)
    det = mha.apply(params, x)
    ref = layers.MultiHeadAttention(2).apply(params, x)
    np.testing.assert_array_equal(np.asarray(det), np.asarray(ref))
    a = mha.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    b = mha.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    c = mha.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(det)) and not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="dropout needs the einsum"):
        layers.dot_product_attention(*_qkv(jnp.float32), implementation="xla", weights_dropout=lambda w: w)

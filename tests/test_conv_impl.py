"""layers.CONV_IMPLS: the matmul convolutions (im2col; XLA's forward with a matmul filter gradient) and the
Winograd ones (F(2x2, 3x3), F(4x4, 3x3)) equal lax.conv_general_dilated in value and both gradients (float32)
through nn.Conv as the models call it; the SDM with them still matches the PyTorch reference, and its and
CRIS's parameter gradients equal those with XLA's convs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxboost.models import layers


@pytest.mark.parametrize("kernel,stride,padding,cin,cout", [
    ((3, 3), 1, ((1, 1), (1, 1)), 5, 16), ((3, 3), 2, ((1, 1), (1, 1)), 8, 8), ((1, 1), 1, "VALID", 12, 4),
    ((3, 3), 1, "SAME", 4, 6), ((7, 7), 2, ((3, 3), (3, 3)), 3, 8), ((3, 3), 1, ((0, 2), (3, 1)), 4, 6),
    ((5, 5), 1, "VALID", 3, 5), ((3, 3), 1, "VALID", 6, 5), ((3, 3), 1, ((2, 0), (1, 2)), 3, 4)],
    ids=["3x3", "3x3_stride2", "1x1", "same", "7x7_stride2_stem", "3x3_uneven_pads", "5x5_valid", "3x3_valid",
         "3x3_pads_0_to_2"])
@pytest.mark.parametrize("impl", ["matmul", "matmul_filter_grad", "winograd", "winograd4", "winograd_filter_grad"])
def test_conv_impls_equal_lax_conv_in_value_and_gradients(impl, kernel, stride, padding, cin, cout, monkeypatch):
    """13 x 11 inputs: odd output sizes, which the Winograd forms compute on the next multiple and crop."""
    monkeypatch.setattr(layers, "MATMUL_FILTER_GRAD_MIN_INPUT", 0)  # the matmul gradient at test sizes
    monkeypatch.setattr(layers, "WINOGRAD_MIN_INPUT", 0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 13, 11, cin)), jnp.float32)
    convs = {name: nn.Conv(cout, kernel, strides=stride, padding=padding,
                           conv_general_dilated=layers.CONV_IMPLS.get(name)) for name in ("xla", impl)}
    params = convs["xla"].init(jax.random.key(1), x)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(convs["xla"].apply(params, x).shape), jnp.float32)
    loss = lambda name: jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(convs[name].apply(p, x) * w), (0, 1)))
    (v_xla, (gp_xla, gx_xla)), (v_mm, (gp_mm, gx_mm)) = loss("xla")(params, x), loss(impl)(params, x)
    np.testing.assert_allclose(v_mm, v_xla, rtol=1e-5)
    np.testing.assert_allclose(gx_mm, gx_xla, atol=1e-5 * float(jnp.abs(gx_xla).max()), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp_mm), jax.tree.leaves(gp_xla)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=1e-5)


@pytest.mark.parametrize("impl", ["matmul", "matmul_filter_grad", "winograd", "winograd4"])
def test_matmul_convs_leave_grouped_and_dilated_convs_to_lax(impl):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 9, 4)), jnp.float32)
    for kw in (dict(feature_group_count=2), dict(kernel_dilation=2)):
        conv = lambda name: nn.Conv(4, (3, 3), conv_general_dilated=layers.CONV_IMPLS.get(name), **kw)
        params = conv("xla").init(jax.random.key(0), x)
        np.testing.assert_array_equal(conv(impl).apply(params, x), conv("xla").apply(params, x))


@pytest.mark.parametrize("impl", ["winograd", "winograd4"])
def test_winograd_runs_unstrided_3x3_convs_as_batched_matmuls(impl, monkeypatch):
    """The forward and both gradients of an unstrided 3x3 conv hold no convolution, only (m+2)^2-batched dots;
    a strided one keeps XLA's."""
    monkeypatch.setattr(layers, "WINOGRAD_MIN_INPUT", 0)
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    conv = lambda stride: (lambda x, w: jnp.sum(layers.CONV_IMPLS.get(impl)(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2))
    jaxpr = str(jax.make_jaxpr(jax.grad(conv(1), (0, 1)))(x, w))
    points = {"winograd": 16, "winograd4": 36}[impl]
    assert "conv_general_dilated" not in jaxpr and f"f32[{points},4,4]" in jaxpr
    assert "conv_general_dilated" in str(jax.make_jaxpr(jax.grad(conv(2), (0, 1)))(x, w))


def test_auto_is_matmul_on_cpu_only_and_unknown_names_are_refused(monkeypatch):
    assert layers.choose_conv("auto", backend="cpu") == "matmul_filter_grad"
    assert layers.choose_conv("auto", backend="gpu") == layers.choose_conv("auto", backend="tpu") == "xla"
    assert layers.choose_conv("xla", backend="cpu") == "xla"
    monkeypatch.setitem(layers.AUTO_CONV, "cpu", "xla")  # what `speed_cris --conv-impl xla` does
    assert layers.choose_conv("auto", backend="cpu") == "xla"
    with pytest.raises(ValueError, match="unknown convolution implementation 'im2col'"):
        layers.conv_fn("im2col")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("impl", ["matmul", "winograd4"])
def test_sdm_with_matmul_convs_matches_torch_reference(impl, monkeypatch):
    import torch
    from jaxboost.convert import sdm as convert_sdm
    from sdm_helpers import random_reference
    from test_sdm_model import SMALL, random_inputs, torch_forward
    fields = SMALL
    ref = random_reference(fields)
    params = convert_sdm.sdm_from_torch_state_dict({k: v.numpy() for k, v in ref.state_dict().items()},
                                                   ConfigDict(fields))
    x, t, labels = random_inputs(fields)
    with torch.no_grad():
        expected = torch_forward(ref, x, t, labels).numpy()
    monkeypatch.setattr(layers, "WINOGRAD_MIN_INPUT", 0)  # matmul_filter_grad's forward is XLA's; gradients: below
    model = convert_sdm.model_from_config(ConfigDict(dict(fields, conv_impl=impl)))
    assert model.conv_impl == impl
    out = jax.jit(model.apply)({"params": params}, x, t, labels)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["matmul_filter_grad", "winograd4"])
def test_sdm_gradients_with_matmul_filter_grad_equal_xla_convs(impl, monkeypatch):
    from jaxboost.models.sdm import Model
    from test_sdm_model import SMALL, random_inputs
    fields = dict(SMALL, attention_resolutions=())  # attention is dense layers: no conv to swap, only compile time
    monkeypatch.setattr(layers, "MATMUL_FILTER_GRAD_MIN_INPUT", 0)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_INPUT", 0)
    x, t, labels = random_inputs(fields)
    params = Model(**fields).init(jax.random.key(0), x, t, labels)["params"]
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)  # no zero layers
    grads = {name: jax.jit(jax.grad(lambda p: jnp.sum(Model(**fields, conv_impl=name).apply({"params": p}, x, t,
                                                                                         labels) ** 2)))(params)
             for name in ("xla", impl)}
    # a floor of 1e-6 of the largest gradient: biases feeding a GroupNorm have mathematically zero gradients,
    # float32 rounding noise of either form's order
    floor = 1e-6 * max(float(jnp.abs(b).max()) for b in jax.tree.leaves(grads["xla"]))
    for a, b in zip(jax.tree.leaves(grads[impl]), jax.tree.leaves(grads["xla"])):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()) + floor, rtol=1e-4)


def _tiny_cris():
    """(model, image batch, token ids, variables) of a small CRIS whose ResNet, FPN and projector convs the
    conv_impl tests swap."""
    from jaxboost.models import cris
    model = cris.Model(stage_sizes=(1, 1, 1, 1), vision_width=16, embed_dim=64, vocab_size=512, text_width=64,
                       text_depth=1, text_heads=4, context_length=8, fpn_out=(32, 64, 64), num_layers=1, num_heads=4,
                       mlp_dim=64, dropout_rate=0.0, upsample="none")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 500, (2, 8)), jnp.int32)
    variables = model.init(jax.random.key(0), x, ids)
    return model, x, ids, variables


def test_cris_convs_take_the_matmul_filter_grad_and_keep_their_gradients(monkeypatch):
    """models/cris.py's @layers.intercept_convs reaches the CLIP ResNet's convs: at threshold 0 every 3x3/7x7
    conv's gradient is the custom matmul one, and the parameter gradients equal XLA's."""
    model, x, ids, variables = _tiny_cris()
    loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x, ids, train=True,
                                         mutable=["batch_stats"])[0] ** 2)
    grads = {}
    for threshold in (0, 2 ** 62):
        monkeypatch.setattr(layers, "MATMUL_FILTER_GRAD_MIN_INPUT", threshold)
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
        assert ("custom_vjp_call" in jaxpr) == (threshold == 0)
        grads[threshold] = jax.jit(jax.grad(loss))(variables["params"])
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[2 ** 62])):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()) + 1e-7, rtol=1e-4)


def test_cris_gradients_with_winograd_convs_equal_xla_convs(monkeypatch):
    """CRIS through @layers.intercept_convs with "auto" set to Winograd F(4x4, 3x3): the unstrided 3x3 convs
    (CLIP ResNet blocks, FPN, projector) run it, the logits equal XLA's to 1e-3 of their largest and the
    parameter gradients to 2e-2 of each leaf's largest (measured: 1.8e-4 and 8.7e-3). Train-mode BatchNorm
    over a batch of 2 at random init amplifies a conv's rounding (gradients up to 1e7 here): F(4, 3)'s ~1e-5
    per conv, 20-30x a direct conv's, grows to those; F(2, 3) stays within ~2e-4. Leaves below 1e-3 of the
    largest gradient are rounding noise of mathematically zero gradients (attention key biases): left out."""
    monkeypatch.setattr(layers, "WINOGRAD_MIN_INPUT", 0)
    model, x, ids, variables = _tiny_cris()
    logits = lambda p: model.apply({**variables, "params": p}, x, ids, train=True, mutable=["batch_stats"])[0]
    out, grads, convs = {}, {}, {}
    for impl in ("xla", "winograd4"):
        monkeypatch.setitem(layers.AUTO_CONV, "cpu", impl)
        traced = jax.make_jaxpr(lambda p: logits(p))(variables["params"])  # a fresh function: no cached trace
        convs[impl] = str(traced).count("conv_general_dilated")
        out[impl], grads[impl] = jax.jit(lambda p: (logits(p), jax.grad(lambda q: jnp.sum(logits(q) ** 2))(p))
                                         )(variables["params"])
    assert convs["winograd4"] < convs["xla"]  # the unstrided 3x3s no longer convolve; 1x1 and strided ones do
    np.testing.assert_allclose(out["winograd4"], out["xla"], atol=1e-3 * float(jnp.abs(out["xla"]).max()))
    largest = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(grads["xla"]))
    for a, b in zip(jax.tree.leaves(grads["winograd4"]), jax.tree.leaves(grads["xla"])):
        if float(jnp.abs(b).max()) > 1e-3 * largest:
            np.testing.assert_allclose(a, b, atol=2e-2 * float(jnp.abs(b).max()))

"""CRIS in Flax vs the PyTorch reference (benchmarks/torch_ref/cris.py, following CRIS.pytorch) on the same
random weights, converted through `jaxboost convert cris`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

from benchmarks.torch_ref import clip_rn50 as clip_ref  # noqa: E402
from benchmarks.torch_ref import cris as ref  # noqa: E402
from jaxboost.convert.cris import cris_from_checkpoint, variables_from_state_dicts  # noqa: E402

CLIP_KW = dict(embed_dim=64, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16, context_length=12,
               vocab_size=50, transformer_width=32, transformer_heads=2, transformer_layers=2)
CRIS_KW = dict(fpn_in=(128, 256, 64), fpn_out=(16, 32, 64), num_layers=2, vis_dim=32, num_head=4, dim_ffn=48,
               word_dim=64)
FIELDS = dict(num_heads=4, text_heads=2)  # head counts are not stored in the weights


def _randomize_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)


def _torch_cris(tmp_path, dropout=0.0, pad_mode="fixed"):
    torch.manual_seed(0)
    model = ref.CRIS(CLIP_KW, dropout=dropout, pad_mode=pad_mode, **CRIS_KW)
    _randomize_norms(model)
    path = tmp_path / "cris.pth"
    # As CRIS saves it: DDP's "module." prefix inside a training checkpoint dict.
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return model.eval(), path


def _inputs(rng, batch=2, size=96, length=8, vocab=50):
    pixels = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    ids = rng.integers(1, vocab - 2, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    ids[0, 4], ids[0, 5:], mask[0, 5:] = vocab - 1, vocab - 1, 0   # padded with <|endoftext|> (largest id)
    ids[1, length - 1] = vocab - 1
    return pixels, ids, mask


def _nhwc(pixels):
    return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def test_cris_matches_torch_reference_logits_and_grads(tmp_path):
    model, path = _torch_cris(tmp_path)
    module, variables = cris_from_checkpoint(str(path), **FIELDS, dropout_rate=0.0, upsample="none")
    pixels, ids, mask = _inputs(np.random.default_rng(0))
    weight = np.random.default_rng(1).normal(size=(2, 24, 24)).astype(np.float32)
    out = model(torch.tensor(pixels), torch.tensor(ids), torch.tensor(mask))[:, 0]
    (out * torch.tensor(weight)).sum().backward()

    def loss(params):
        logits = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, _nhwc(pixels),
                              jnp.asarray(ids), jnp.asarray(mask))
        return (logits * weight).sum(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert logits.shape == (2, 24, 24)
    np.testing.assert_allclose(np.asarray(logits), out.detach().numpy(), atol=1e-4, rtol=0)
    grad_sd = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for k, p in model.named_parameters()}
    grad_sd.update({k: np.zeros(b.shape, np.float32) for k, b in model.named_buffers()})
    torch_grads = traverse_util.flatten_dict(variables_from_state_dicts(grad_sd, None)[0]["params"], sep="/")
    ours = traverse_util.flatten_dict(grads, sep="/")
    assert ours.keys() == torch_grads.keys()
    for name, theirs in torch_grads.items():
        if name.endswith("key/bias"):
            continue  # softmax is shift-invariant: the true gradient is 0, both sides hold rounding noise
        norm = np.linalg.norm(theirs)
        assert norm > 0, name
        assert np.linalg.norm(np.asarray(ours[name]) - theirs) <= 1e-4 * norm, name


def test_cris_train_mode_batch_norm_and_upsampling_match_torch(tmp_path):
    model, path = _torch_cris(tmp_path)
    module, variables = cris_from_checkpoint(str(path), **FIELDS, dropout_rate=0.0)
    pixels, ids, mask = _inputs(np.random.default_rng(2), batch=4)
    # Batch statistics over small batches are ill-conditioned; torch runs in float64 as the exact reference.
    model.double().train()
    out = model(torch.tensor(pixels).double(), torch.tensor(ids), torch.tensor(mask))
    # Our default returns logits at the input size as medvlsm (torch bicubic, align_corners=True).
    expected = torch.nn.functional.interpolate(out, size=(96, 96), mode="bicubic", align_corners=True)[:, 0]
    apply = jax.jit(lambda v, *a: module.apply(v, *a, train=True, mutable=["batch_stats"]))
    logits, updates = apply(variables, _nhwc(pixels), jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (4, 96, 96)
    # Our side is float32 against torch's float64: on a CI machine (another CPU, so other XLA:CPU kernels and
    # summation orders) 90 of 36,864 logits of magnitude ~5 were off by up to 1.3e-4 (2.6e-5 relative),
    # where this CPU stays under 1e-4. Hence an added relative term; 1e-4 of |x| is still ~800 float32 ulps.
    # On a Zen 3 EPYC (AVX2, no AVX-512) 2 logits near 0.17 were off by 1.27e-4: train-mode BatchNorm over a
    # batch of 4 magnifies float32 rounding by the inverse of the batch's small spread, so the absolute term
    # is 2e-4, ~2e-5 of the logits' range.
    np.testing.assert_allclose(np.asarray(logits), expected.detach().numpy(), atol=2e-4, rtol=1e-4)
    # Running means move as torch's do (momentum 0.1).
    np.testing.assert_allclose(updates["batch_stats"]["neck"]["aggr"]["bn"]["mean"],
                               model.neck.aggr[1].running_mean.numpy(), atol=1e-5)


def test_cris_pad_modes_original_masks_nothing_fixed_masks_padding(tmp_path):
    model, path = _torch_cris(tmp_path)
    pixels, ids, mask = _inputs(np.random.default_rng(3))
    outs = {}
    for pad_mode in ("fixed", "original"):
        module, variables = cris_from_checkpoint(str(path), **FIELDS, dropout_rate=0.0, upsample="none",
                                                 pad_mode=pad_mode)
        outs[pad_mode] = np.asarray(jax.jit(module.apply)(variables, _nhwc(pixels), jnp.asarray(ids),
                                                          jnp.asarray(mask)))
        model.pad_mode = pad_mode
        with torch.no_grad():
            expected = model(torch.tensor(pixels), torch.tensor(ids), torch.tensor(mask))[:, 0].numpy()
        np.testing.assert_allclose(outs[pad_mode], expected, atol=1e-4, rtol=0)
    # Sample 0 is padded, so the modes differ there; sample 1 has no padding, so they agree.
    assert np.abs(outs["fixed"][0] - outs["original"][0]).max() > 1e-3
    np.testing.assert_allclose(outs["fixed"][1], outs["original"][1], atol=1e-5)


def test_cris_from_clip_only_initialises_head_and_runs(tmp_path):
    torch.manual_seed(0)
    clip_model = clip_ref.CLIP(**CLIP_KW, pool="clip")
    sd = dict(clip_model.state_dict(), input_resolution=torch.tensor(64), context_length=torch.tensor(12),
              vocab_size=torch.tensor(50))
    torch.save(sd, tmp_path / "rn.pt")
    module, variables = cris_from_checkpoint(clip=str(tmp_path / "rn.pt"), **FIELDS, fpn_out=(16, 32, 64),
                                             num_layers=1, mlp_dim=48)
    np.testing.assert_array_equal(variables["params"]["visual"]["stem1"]["conv"]["kernel"],
                                  clip_model.visual.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert "connect" in variables["params"]["visual"]["attnpool"]  # CRIS's residual, absent from CLIP
    pixels, ids, mask = _inputs(np.random.default_rng(4), size=64)
    assert np.isfinite(jax.jit(module.apply)(variables, _nhwc(pixels), jnp.asarray(ids), jnp.asarray(mask))).all()


def test_convert_cris_cli_roundtrip(tmp_path):
    from jaxboost import cli
    from jaxboost.convert.clip import load_converted
    _, path = _torch_cris(tmp_path)
    assert cli.main(["convert", "cris", "--checkpoint", str(path), "--out", str(tmp_path / "out"),
                     "--num-heads", "4", "--text-heads", "2"]) == 0
    module, variables = load_converted(str(tmp_path / "out"))
    direct_module, direct = cris_from_checkpoint(str(path), **FIELDS)
    assert module == direct_module
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(direct)):
        np.testing.assert_array_equal(a, b)


def test_cris_converter_rejects_other_architectures_and_names_missing_tensors(tmp_path):
    model, path = _torch_cris(tmp_path)
    with pytest.raises(ValueError, match="not a CRIS checkpoint"):
        torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
        cris_from_checkpoint(str(tmp_path / "other.pt"))
    sd = {k: v for k, v in model.state_dict().items() if k != "decoder.layers.1.norm2.bias"}
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="decoder.layers.1.norm2.bias"):
        cris_from_checkpoint(str(tmp_path / "broken.pt"), **FIELDS)
    sd = dict(model.state_dict(), **{"neck.extra.weight": torch.zeros(2)})
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="neck.extra.weight"):
        cris_from_checkpoint(str(tmp_path / "extra.pt"), **FIELDS)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        cris_from_checkpoint(str(tmp_path / "nowhere.pt"))


def test_cris_rejects_wrong_channel_count(tmp_path):
    _, path = _torch_cris(tmp_path)
    module, variables = cris_from_checkpoint(str(path), **FIELDS)
    with pytest.raises(ValueError, match="3"):
        module.apply(variables, jnp.zeros((1, 64, 64, 4)), jnp.ones((1, 5), jnp.int32))

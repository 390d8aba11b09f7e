"""CLIPSeg in Flax vs HF `CLIPSegForImageSegmentation` (torch) on the same random weights."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxboost.convert import clip as convert_clip  # noqa: E402
from jaxboost.convert.hf_clipseg import clipseg_from_hf, variables_from_state_dict, model_fields  # noqa: E402
from jaxboost.models import clipseg  # noqa: E402
from cpu_env import optimized_codegen  # noqa: E402

SMALL = dict(
    text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=16, eos_token_id=2),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                       image_size=64, patch_size=16),
    projection_dim=24, extract_layers=(1, 2), reduce_dim=16, decoder_num_attention_heads=2,
    decoder_intermediate_size=32, use_complex_transposed_convolution=True)
# CIDAS/clipseg-rd64-refined: ViT-B/16 at 224, text 512x12, reduce 64, complex head.
FULL = dict(vision_config=dict(patch_size=16, image_size=224), use_complex_transposed_convolution=True)


def _hf_model(tmp_path, config_kwargs, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPSegForImageSegmentation(transformers.CLIPSegConfig(**config_kwargs)).eval()
    # HF's random init feeds the decoder activations in the hundreds (attention logits ~1e5, a saturated
    # softmax whose gradients are ~1% rounding noise even in torch float32 vs float64). Rescale the decoder's
    # input projections and the last layer so activations and logits sit in a trained model's range.
    with torch.no_grad():
        for layer in (*model.decoder.reduces, model.decoder.film_mul, model.decoder.film_add):
            layer.weight.mul_(0.05)
        last = model.decoder.transposed_convolution
        last = last[-1] if isinstance(last, torch.nn.Sequential) else last
        last.weight.mul_(0.01)
    model.save_pretrained(tmp_path)
    return model


def _inputs(rng, batch, size, vocab, length, eos):
    pixels = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    ids = rng.integers(1, min(vocab, 90), size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    ends = rng.integers(2, length, size=batch)
    for b, end in enumerate(ends):
        ids[b, end] = eos if eos != 2 else vocab - 1
        ids[b, end + 1:] = eos if eos != 2 else vocab - 1   # HF pads CLIP with the end-of-text token
        mask[b, end + 1:] = 0
    return pixels, ids, mask


def _compare(tmp_path, config_kwargs, cases, batch):
    """cases: (image size, compare decoder gradients?). Logits: float32 on both sides."""
    hf = _hf_model(tmp_path, config_kwargs)
    module, variables = clipseg_from_hf(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    vocab, eos = cfg["text_config"]["vocab_size"], cfg["text_config"]["eos_token_id"]
    rng = np.random.default_rng(0)
    for size, grads in cases:
        pixels, ids, mask = _inputs(rng, batch, size, vocab, 7, eos)
        weight = rng.normal(size=(batch, size, size)).astype(np.float32)
        with torch.no_grad():
            out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                     attention_mask=torch.tensor(mask)).logits
        args = (jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), jnp.asarray(mask))
        if grads:
            # Gradients are compared with torch in float64: at full size torch's own float32 decoder gradients
            # are up to ~1e-3 (relative) off its float64 ones, ours ~1e-6.
            hf.double().zero_grad()
            out64 = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).double(),
                       attention_mask=torch.tensor(mask)).logits
            (out64 * torch.tensor(weight).double()).sum().backward()
            grad_sd = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
                       for k, p in hf.named_parameters()}
            hf.float()

            def loss(params):
                logits = module.apply({"params": params}, *args)
                return (logits * weight).sum(), logits

            # Compiled as a user's program is: the suite's -O0 codegen (cpu_env) puts the full-size LayerNorm
            # scale's gradient 6.6e-4 off float64, this 3e-4 tolerance's check of our math.
            grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
            (_, logits), g = optimized_codegen(grad_fn, variables["params"])
        else:
            logits = jax.jit(module.apply)(variables, *args)
        ref = out.detach().numpy()
        assert logits.shape == ref.shape == (batch, size, size)
        assert 1.0 < np.abs(ref).max() < 1e3  # a real range, so the absolute tolerance means something
        np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)
        if not grads:
            continue
        # Torch grads -> our layout through the converter itself (the layout maps are linear).
        torch_g = variables_from_state_dict(grad_sd, model_fields(cfg), "grads")["params"]
        decoder = [k for k in g if clipseg.decoder_param_filter((k,))]
        assert decoder and all(np.abs(x).max() == 0 for x in jax.tree_util.tree_leaves((g["vision"], g["text"])))
        ours_flat = traverse_util.flatten_dict({k: g[k] for k in decoder}, sep="/")
        theirs_flat = traverse_util.flatten_dict({k: torch_g[k] for k in decoder}, sep="/")
        assert ours_flat.keys() == theirs_flat.keys()
        for name, theirs in theirs_flat.items():
            if name.endswith("attn/key/bias"):
                continue  # softmax is shift-invariant: the true gradient is 0, both sides hold rounding noise
            # Relative L2 error per tensor (single elements of sums over B*H*W terms carry rounding noise).
            norm = np.linalg.norm(theirs)
            assert norm > 0, name
            # 3e-4: the deepest decoder block's LayerNorm scale (its gradient sums over every token after
            # the most layers) came to 1.2e-4 on a CI machine's CPU, whose XLA:CPU kernels sum in another order.
            assert np.linalg.norm(np.asarray(ours_flat[name]) - theirs) <= 3e-4 * norm, name


def test_clipseg_small_matches_hf_logits_and_decoder_grads(tmp_path):
    _compare(tmp_path, SMALL, cases=((64, True), (96, True)), batch=2)


@pytest.mark.slow
def test_clipseg_full_size_matches_hf_at_352_and_224(tmp_path):
    _compare(tmp_path, FULL, cases=((352, True), (224, False)), batch=1)


def test_clipseg_trainable_encoders_get_gradient(tmp_path):
    # The frozen default (HF-exact, zero encoder gradients) is asserted in the parity tests above.
    _hf_model(tmp_path, SMALL)
    module, variables = clipseg_from_hf(str(tmp_path), freeze_encoders=False)
    pixels, ids, mask = _inputs(np.random.default_rng(1), 1, 64, 100, 6, 2)
    args = (jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), jnp.asarray(mask))
    g = jax.jit(jax.grad(lambda p: module.apply({"params": p}, *args).sum()))(variables["params"])
    for tower in ("vision", "text"):
        assert sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(g[tower])) > 0, tower


def test_clipseg_rejects_wrong_channel_count(tmp_path):
    _hf_model(tmp_path, SMALL)
    module, variables = clipseg_from_hf(str(tmp_path))
    with pytest.raises(ValueError, match="3"):
        module.apply(variables, jnp.zeros((1, 64, 64, 1)), jnp.ones((1, 5), jnp.int32))


def test_clipseg_rejects_tokens_longer_than_context(tmp_path):
    _hf_model(tmp_path, SMALL)
    module, variables = clipseg_from_hf(str(tmp_path))
    with pytest.raises(ValueError, match="context_length"):
        module.apply(variables, jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 17), jnp.int32))


def test_clipseg_converter_rejects_other_architecture(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=SMALL["text_config"], vision_config=SMALL["vision_config"],
                                  projection_dim=24)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="clipseg"):
        clipseg_from_hf(str(tmp_path))
    # Right config, wrong weights: named in the error.
    cfg_json = json.load(open(tmp_path / "config.json"))
    _hf_model(tmp_path / "seg", SMALL)
    json.dump(json.load(open(tmp_path / "seg" / "config.json")), open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="film_mul"):
        clipseg_from_hf(str(tmp_path))
    assert cfg_json["model_type"] == "clip"


def test_clipseg_converter_names_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file
    _hf_model(tmp_path, SMALL)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["decoder.reduces.1.bias"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="decoder.reduces.1.bias"):
        clipseg_from_hf(str(tmp_path))


def test_convert_clipseg_cli_roundtrip(tmp_path):
    from jaxboost import cli
    _hf_model(tmp_path / "hf", SMALL)
    assert cli.main(["convert", "clipseg", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0
    module, variables = convert_clip.load_converted(str(tmp_path / "out"))
    ref_module, ref_vars = clipseg_from_hf(str(tmp_path / "hf"))
    args = (jnp.ones((1, 64, 64, 3)), jnp.array([[5, 6, 99]]))
    np.testing.assert_array_equal(module.apply(variables, *args), ref_module.apply(ref_vars, *args))


@pytest.mark.parametrize("name", ["clipseg", "cris"])
def test_segmenter_configs_build_their_models(name):
    from jaxboost import registry
    from jaxboost.config import load_config
    for v in ("tiny", "full"):
        c = load_config(f"configs/{name}.py:{v}")
        assert c.trainer == "vl_seg" and c.model_name == name and c.finetune_mode == "fresh"
        fields = {k: tuple(x) if isinstance(x, list) else x for k, x in c.model.items()}
        model = registry.model_class(name)(**dict(fields, vocab_size=fields["vocab_size"] or 300))
        size = c.data.size
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                jnp.ones((1, 8), jnp.int32))
        if name == "clipseg" and v == "full":  # CLIPSeg paper: decoder ~1.13M parameters
            head = sum(x.size for k, t in shapes["params"].items() if clipseg.decoder_param_filter((k,))
                       for x in jax.tree_util.tree_leaves(t))
            assert head == 1_127_009

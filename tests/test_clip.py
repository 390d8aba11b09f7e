"""CLIP towers vs HF CLIPModel and the OpenAI-layout RN50 reference; CLIP tokenizers from local files."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks.torch_ref import clip_rn50 as clip_ref  # noqa: E402
from jaxboost.convert import clip as convert_clip  # noqa: E402
from jaxboost.data.tokenize_clip import ClipTokenizer  # noqa: E402
from jaxboost.models import clip  # noqa: E402

TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
              patch_size=16)


def _rel_l2(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


@pytest.mark.parametrize("eos_token_id", [2, 99])  # legacy argmax pooling, and first-<|endoftext|> pooling
def test_clip_text_tower_matches_hf(eos_token_id):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=eos_token_id),
                                                        vision_config=VISION, projection_dim=24)).eval()
    take = convert_clip.Taker({k: v.numpy() for k, v in hf.state_dict().items()}, "hf")
    params = convert_clip.hf_text_params(take, "text_model.", 2, "text_projection")
    module = clip.TextEncoder(100, 32, 2, 2, 64, 16, 24, eos_token_id)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 90, size=(3, 9))
    mask = np.ones_like(ids)
    ids[0, 4:], mask[0, 5:] = 99, 0     # padded with the end-of-text id, as HF's CLIP tokenizer does
    ids[1, 8] = 99
    ids[2, 3], ids[2, 6] = 99, 95        # a later larger id would fool argmax, not first-eos pooling
    out = hf.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    pooled = hf.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    pooled = getattr(pooled, "pooler_output", pooled)
    tokens, ours = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(tokens, out.last_hidden_state.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(ours, pooled.detach().numpy(), atol=1e-5)
    # Gradient of the pooled embedding w.r.t. every parameter.
    w = rng.normal(size=ours.shape).astype(np.float32)
    (pooled * torch.tensor(w)).sum().backward()
    pooled_sum = lambda p: (module.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask))[1] * w).sum()
    grads = jax.jit(jax.grad(pooled_sum))(params)
    gsd = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for k, p in hf.named_parameters()}
    theirs = traverse_util.flatten_dict(convert_clip.hf_text_params(convert_clip.Taker(gsd, "g"), "text_model.", 2,
                                                                    "text_projection"), sep="/")
    for name, g in traverse_util.flatten_dict(grads, sep="/").items():
        if name.endswith("key/bias") or np.linalg.norm(theirs[name]) == 0:
            continue  # shift-invariant softmax; rows of unused token embeddings
        assert _rel_l2(g, theirs[name]) <= 1e-4, name


@pytest.mark.parametrize("size", [64, 96])  # the trained grid, and a bicubic-resized position embedding
def test_clip_vision_tower_matches_hf(size):
    """`clip.clip_vit`, the tower CLIPSeg builds: every hidden state, the pooled class token and its projection."""
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                        projection_dim=24)).eval()
    take = convert_clip.Taker({k: v.numpy() for k, v in hf.state_dict().items()}, "hf")
    params = convert_clip.hf_vision_params(take, "vision_model.", 2, post_norm=True)
    module = clip.clip_vit(32, 2, 2, 64, 16, 64)
    pixels = np.random.default_rng(1).normal(size=(2, 3, size, size)).astype(np.float32)
    ref = hf.vision_model(pixel_values=torch.tensor(pixels), output_hidden_states=True,
                          interpolate_pos_encoding=True)
    ref_features = hf.get_image_features(pixel_values=torch.tensor(pixels), interpolate_pos_encoding=True)
    ref_features = getattr(ref_features, "pooler_output", ref_features).detach().numpy()
    tokens, hidden = module.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                                  output_hidden_states=True)
    for ours, theirs in zip(hidden, ref.hidden_states, strict=True):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(tokens[:, 0], ref.pooler_output.detach().numpy(), atol=1e-5)
    projection = take.dense("visual_projection", bias=False)["kernel"]
    np.testing.assert_allclose(np.asarray(tokens[:, 0]) @ projection, ref_features, atol=1e-5)


def _rn_reference(pool):
    torch.manual_seed(0)
    model = clip_ref.ModifiedResNet((1, 2, 1, 1), output_dim=48, heads=4, input_resolution=64, width=16, pool=pool)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("pool,size", [("clip", 64), ("clip", 96)])  # "cris" pooling: tests/test_cris.py
def test_clip_resnet_matches_openai_layout_reference(pool, size):
    model = _rn_reference(pool)
    sd = {"visual." + k: v.numpy() for k, v in model.state_dict().items()}
    params, stats, fields = convert_clip.openai_resnet_variables(convert_clip.Taker(sd, "rn"), "visual.", pool)
    assert fields == dict(stage_sizes=(1, 2, 1, 1), width=16, num_heads=8, output_dim=48, image_size=64, pool=pool)
    module = clip.ModifiedResNet(**dict(fields, num_heads=4))
    pixels = np.random.default_rng(2).normal(size=(2, 3, size, size)).astype(np.float32)
    c3, c4, pooled = model(torch.tensor(pixels))
    w = np.random.default_rng(3).normal(size=pooled.shape).astype(np.float32)
    (pooled * torch.tensor(w)).sum().backward()

    def loss(p):
        out = module.apply({"params": p, "batch_stats": stats}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
        return (out[2] * (w if pool == "clip" else w.transpose(0, 2, 3, 1))).sum(), out

    (_, (o3, o4, o5)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(o3, c3.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(o4, c4.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4)
    ref5 = pooled.detach().numpy()
    np.testing.assert_allclose(o5, ref5 if pool == "clip" else ref5.transpose(0, 2, 3, 1), atol=1e-4)
    gsd = {"visual." + k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
           for k, p in model.named_parameters()}
    gsd.update({"visual." + k: b.numpy() for k, b in model.named_buffers()})
    theirs = traverse_util.flatten_dict(
        convert_clip.openai_resnet_variables(convert_clip.Taker(gsd, "g"), "visual.", pool)[0], sep="/")
    for name, g in traverse_util.flatten_dict(grads, sep="/").items():
        if name.endswith("key/bias") or (pool == "cris" and name.endswith("pos_embedding")):
            continue  # shift-invariant softmax; CRIS never reads the class-token row (zero on both sides)
        assert _rel_l2(g, theirs[name]) <= 1e-4, name


def test_clip_resnet_rejects_vit_checkpoint():
    take = convert_clip.Taker({"visual.class_embedding": np.zeros(8), "visual.conv1.weight": np.zeros((8, 3, 4, 4))},
                              "vit.pt")
    with pytest.raises(ValueError, match="not a CLIP ResNet checkpoint.*ViT"):
        convert_clip.openai_resnet_variables(take)


PROMPTS = ["Left ventricular cavity in two-chamber view of the heart.",
           "Myocardium in four-chamber view in the cardiac ultrasound at end of the systole cycle.",
           "Left atrium cavity of oval shape."]


def test_trained_tokenizer_is_recorded_and_reloads(tmp_path):
    tok = ClipTokenizer.train(PROMPTS, str(tmp_path / "tok"), vocab_size=300, context_length=64)
    ids, mask = tok.tokenize(PROMPTS)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (3, 64)
    # CLIP conventions: <|startoftext|> first, <|endoftext|> the largest id, padding with it.
    assert (ids[:, 0] == tok.hf.convert_tokens_to_ids("<|startoftext|>")).all()
    assert tok.eos_token_id == len(tok) - 1 == ids.max()
    assert (ids[mask == 0] == tok.eos_token_id).all()
    assert (ids[np.arange(3), mask.sum(1) - 1] == tok.eos_token_id).all()
    again = ClipTokenizer.from_folder(str(tmp_path / "tok"), context_length=64)
    np.testing.assert_array_equal(again.tokenize(PROMPTS)[0], ids)


def test_tokenizer_rejects_text_longer_than_context_unless_truncating(tmp_path):
    tok = ClipTokenizer.train(PROMPTS, str(tmp_path / "tok"), vocab_size=300, context_length=8)
    with pytest.raises(ValueError, match="more than the context length 8"):
        tok.tokenize(PROMPTS[1])
    ids, mask = tok.tokenize(PROMPTS[1], truncate=True)
    assert mask.all() and ids[0, -1] == tok.eos_token_id
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipTokenizer.from_folder(str(tmp_path / "nowhere"))


def test_tokenizer_loads_a_saved_hf_clip_tokenizer(tmp_path):
    # A tiny CLIP BPE vocabulary in the real file format (byte alphabet, "</w>" word ends, one merge).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]  # GPT-2 byte map
    vocab = chars + [c + "</w>" for c in chars] + ["th", "<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nt h\n")
    transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(
        tmp_path / "saved")
    tok = ClipTokenizer.from_folder(str(tmp_path / "saved"), context_length=10)
    ids, mask = tok.tokenize(["the heart"])
    assert ids[0, 0] == len(vocab) - 2 and ids[0, mask[0].sum() - 1] == len(vocab) - 1
    assert len(vocab) - 3 in ids[0]  # the merge "th" was applied

"""BERT parity with HF transformers (torch), random weights saved to a local folder and converted."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxboost.convert import bert as convert_bert
from jaxboost.models import bert

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=40, hidden_act="gelu", attn_implementation="eager")


def _inputs(rng, b=3, length=9):
    ids = rng.integers(0, 97, (b, length))
    mask = np.ones((b, length), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _save(model, path):
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values so a swapped tensor shows
        for n, p in model.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)


def test_bert_text_encoder_matches_hf_bertmodel(tmp_path, rng):
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**SMALL), add_pooling_layer=True)
    _save(hf, tmp_path)
    kwargs, params, unused = convert_bert.load_hf_bert(str(tmp_path))
    assert any("pooler" in k for k in unused)
    ids, mask = _inputs(rng)
    tt = rng.integers(0, 2, ids.shape)
    with torch.no_grad():
        want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(tt)).last_hidden_state.numpy()
    model = bert.Model(**kwargs)
    got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(tt))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_bert_causal_cross_attention_decoder_matches_hf(tmp_path, rng):
    """is_decoder + add_cross_attention: causal self-attention and cross-attention in every layer, LM head."""
    torch.manual_seed(1)
    cfg = transformers.BertConfig(**SMALL, is_decoder=True, add_cross_attention=True)
    hf = transformers.BertLMHeadModel(cfg)
    _save(hf, tmp_path)
    kwargs, params, _ = convert_bert.load_hf_bert(str(tmp_path))
    assert kwargs["causal"] and kwargs["fusion_layer"] == 0 and kwargs["mlm_head"]
    ids, mask = _inputs(rng)
    image = rng.standard_normal((3, 5, 32)).astype(np.float32)
    image_mask = np.ones((3, 5), np.int64)
    image_mask[0, 4:] = 0
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), encoder_hidden_states=torch.tensor(image),
                 encoder_attention_mask=torch.tensor(image_mask), output_hidden_states=True)
    model = bert.Model(**kwargs)
    variables = {"params": params}
    hidden = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(image),
                         jnp.asarray(image_mask))
    logits = model.apply(variables, hidden, method=model.mlm_logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], out.hidden_states[-1].numpy()[valid], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits)[valid], out.logits.numpy()[valid], atol=1e-4)


def test_bert_gradients_match_hf(tmp_path, rng):
    torch.manual_seed(2)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**SMALL))
    _save(hf, tmp_path)
    kwargs, params, _ = convert_bert.load_hf_bert(str(tmp_path))
    ids, mask = _inputs(rng)
    w = rng.standard_normal((3, 9, 97)).astype(np.float32)
    logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    (logits * torch.tensor(w) * torch.tensor(mask)[..., None]).sum().backward()
    model = bert.Model(**kwargs)

    def f(p):
        h = model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask))
        out = model.apply({"params": p}, h, method=model.mlm_logits)
        return jnp.sum(out * w * mask[..., None])

    grads = jax.grad(f)(params)
    ours = np.asarray(grads["layer1"]["attention"]["query"]["kernel"]).T
    theirs = hf.bert.encoder.layer[1].attention.self.query.weight.grad.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["mlm_bias"]), hf.cls.predictions.bias.grad.numpy(), atol=1e-4)


def test_bert_converter_names_missing_tensor(tmp_path):
    hf = transformers.BertModel(transformers.BertConfig(**SMALL), add_pooling_layer=False)
    sd = {k: v for k, v in hf.state_dict().items() if "layer.2.output.dense.weight" not in k}
    import safetensors.torch
    hf.config.save_pretrained(tmp_path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\.output\.dense\.weight"):
        convert_bert.load_hf_bert(str(tmp_path))

"""BERT encoder in the ALBEF/MUMC layout: text layers, fusion layers with cross-attention, MLM head.

One module covers the three ways MUMC uses BERT:
- text encoder: `text(input_ids, mask)` runs the embeddings and layers [0, fusion_layer) (self-attention only);
- fusion: `fuse(hidden, mask, image_tokens, image_mask)` runs layers [fusion_layer, depth), each with
  self-attention, cross-attention to the image tokens, FFN;
- answer decoder (`causal=True`, `fusion_layer=0`, depth 6): causal self-attention and cross-attention in
  every layer, then the MLM head as the LM head.
Post-LN layers (x = LN(x + sublayer(x))), erf GELU, LayerNorm eps 1e-12 as HF BertModel. Parameter names
follow HF roles so `jaxboost.convert.bert` maps state dicts by rule:
  embeddings/{word,position,token_type}_embeddings, embeddings/ln
  layer{i}/attention/{query,key,value,out}, layer{i}/attention_ln,
  layer{i}/crossattention/{query,key,value,out}, layer{i}/crossattention_ln,
  layer{i}/intermediate, layer{i}/output, layer{i}/output_ln
  mlm_transform, mlm_ln, mlm_bias (decoder tied to the word embeddings) or mlm_decoder (untied).
Shapes: ids [B, L] int; masks [B, L] (1/True = real token); hidden [B, L, D]; image tokens [B, N, Dv].
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxboost.models import layers


def attention_mask(key_mask, query_len: int | None = None, causal: bool = False):
    """[B, Lk] 1/0 key mask -> boolean [B, 1, Lq, Lk] (True = attend), optionally causal (Lq == Lk)."""
    mask = key_mask.astype(bool)[:, None, None, :]
    if causal:
        lq = query_len or key_mask.shape[1]
        mask = mask & jnp.tril(jnp.ones((lq, key_mask.shape[1]), bool))[None, None]
    return mask


class Embeddings(nn.Module):
    vocab_size: int
    hidden: int
    max_position: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    dropout_rate: float = 0.1
    dtype: layers.Dtype | None = None

    def setup(self):
        init = nn.initializers.normal(0.02)
        embed = lambda n: nn.Embed(n, self.hidden, embedding_init=init, dtype=self.dtype)
        self.word_embeddings = embed(self.vocab_size)
        self.position_embeddings = embed(self.max_position)
        self.token_type_embeddings = embed(self.type_vocab_size)
        self.ln = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(self, input_ids, token_type_ids=None, deterministic: bool = True):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.ln(x), deterministic=deterministic)

    def attend(self, h):
        """Tied output projection: [..., D] -> [..., vocab] logits against the word embeddings."""
        return self.word_embeddings.attend(h)


class Layer(nn.Module):
    """Post-LN BERT layer; `cross_attention` adds ALBEF's cross-attention block between self-attn and FFN."""
    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    ln_eps: float = 1e-12
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    attention_impl: str = "auto"
    dtype: layers.Dtype | None = None

    @nn.compact
    def __call__(self, x, self_mask, context=None, context_mask=None, deterministic: bool = True):
        def sublayer(name, y, ctx=None, ctx_mask=None, mask=None):
            a = layers.MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout_rate,
                                          implementation=self.attention_impl, dtype=self.dtype, name=name)(
                y, context=ctx, mask=mask if ctx is None else ctx_mask, deterministic=deterministic)
            a = nn.Dropout(self.dropout_rate)(a, deterministic=deterministic)
            return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name + "_ln")(y + a)

        x = sublayer("attention", x, mask=self_mask)
        if self.cross_attention:
            assert context is not None, "a fusion layer needs the image tokens (context)"
            x = sublayer("crossattention", x, ctx=context, ctx_mask=context_mask)
        h = layers.ACTIVATIONS["gelu"](nn.Dense(self.mlp_dim, dtype=self.dtype, name="intermediate")(x))
        h = nn.Dropout(self.dropout_rate)(nn.Dense(x.shape[-1], dtype=self.dtype, name="output")(h),
                                          deterministic=deterministic)
        return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="output_ln")(x + h)


class Model(nn.Module):
    """BERT with text layers [0, fusion_layer) and cross-attending fusion layers [fusion_layer, depth).

    `fusion_layer >= depth` gives a plain text BERT. `causal=True` makes self-attention causal (decoder).
    """
    vocab_size: int = 30522
    hidden: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    fusion_layer: int = 6
    causal: bool = False
    mlm_head: bool = True
    tied_mlm_decoder: bool = True
    ln_eps: float = 1e-12
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    attention_impl: str = "auto"
    remat: bool | str = False      # a remat policy name (layers.REMAT_POLICIES); True = "full"
    dtype: layers.Dtype | None = None

    def setup(self):
        self.embeddings = Embeddings(self.vocab_size, self.hidden, self.max_position, self.type_vocab_size,
                                     self.ln_eps, self.dropout_rate, self.dtype)
        layer_cls = layers.remat(Layer, self.remat, static_argnums=(5,))
        self.layers = [
            layer_cls(self.num_heads, self.mlp_dim, i >= self.fusion_layer, self.ln_eps, self.dropout_rate,
                      self.attention_dropout_rate, self.attention_impl, self.dtype, name=f"layer{i}")
            for i in range(self.depth)]
        if self.mlm_head:
            self.mlm_transform = nn.Dense(self.hidden, dtype=self.dtype)
            self.mlm_ln = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)
            if self.tied_mlm_decoder:
                self.mlm_bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,))
            else:
                self.mlm_decoder = nn.Dense(self.vocab_size, dtype=self.dtype)

    def _run(self, x, mask, start, stop, image_tokens=None, image_mask=None, deterministic=True):
        self_mask = attention_mask(mask, x.shape[1], self.causal)
        ctx_mask = None
        if image_tokens is not None:
            if image_mask is None:
                image_mask = jnp.ones(image_tokens.shape[:2], jnp.int32)
            ctx_mask = attention_mask(image_mask)
        for layer in self.layers[start:stop]:
            x = layer(x, self_mask, image_tokens, ctx_mask, deterministic)
        return x

    def text(self, input_ids, mask, token_type_ids=None, deterministic: bool = True):
        """Embeddings + text-only layers: ids [B, L] -> [B, L, D]."""
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        return self._run(x, mask, 0, min(self.fusion_layer, self.depth), deterministic=deterministic)

    def fuse(self, hidden, mask, image_tokens, image_mask=None, deterministic: bool = True):
        """Fusion layers on text states: hidden [B, L, D], image_tokens [B, N, Dv] -> [B, L, D]."""
        return self._run(hidden, mask, min(self.fusion_layer, self.depth), self.depth, image_tokens,
                         image_mask, deterministic)

    def mlm_logits(self, hidden):
        """MLM / LM head: [B, L, D] -> [B, L, vocab]."""
        h = self.mlm_ln(layers.ACTIVATIONS["gelu"](self.mlm_transform(hidden)))
        if self.tied_mlm_decoder:
            return self.embeddings.attend(h) + self.mlm_bias
        return self.mlm_decoder(h)

    def __call__(self, input_ids, mask, image_tokens=None, image_mask=None, token_type_ids=None,
                 deterministic: bool = True):
        """Full pass (text layers, then fusion layers if any): -> hidden [B, L, D]. Also creates the MLM head."""
        x = self.text(input_ids, mask, token_type_ids, deterministic)
        if self.fusion_layer < self.depth:
            x = self.fuse(x, mask, image_tokens, image_mask, deterministic)
        if self.mlm_head and self.is_initializing():
            self.mlm_logits(x)
        return x

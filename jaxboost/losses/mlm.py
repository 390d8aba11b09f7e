"""Masked language modelling for MUMC: BERT 80/10/10 masking and the loss distilled from momentum logits.

`mask_tokens` picks 15% of the tokens (never special tokens: [PAD], [CLS], [SEP]) and replaces 80% of the
picked ones with [MASK], 10% with a random token and keeps 10%. MUMC's code leaves [SEP] maskable; pass
`special_ids=(pad, cls)` to get that behaviour. The loss on picked tokens is
(1 - alpha) * CE(logits, original) + alpha * soft CE(logits, softmax(momentum logits)).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def mask_tokens(rng, input_ids, vocab_size: int, mask_id: int, special_ids: Sequence[int],
                probability: float = 0.15):
    """input_ids [B, L] -> (masked ids [B, L], target mask [B, L] bool: positions that carry the loss)."""
    r_pick, r_mask, r_rand, r_word = jax.random.split(rng, 4)
    special = jnp.isin(input_ids, jnp.asarray(list(special_ids), input_ids.dtype))
    picked = jax.random.bernoulli(r_pick, probability, input_ids.shape) & ~special
    to_mask = jax.random.bernoulli(r_mask, 0.8, input_ids.shape) & picked
    to_random = jax.random.bernoulli(r_rand, 0.5, input_ids.shape) & picked & ~to_mask
    random_words = jax.random.randint(r_word, input_ids.shape, 0, vocab_size, input_ids.dtype)
    ids = jnp.where(to_mask, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    ids = jnp.where(to_random, random_words, ids)
    return ids, picked


def mlm_distill_loss(logits, logits_m, labels, target_mask, alpha):
    """logits/logits_m [B, L, V]; labels [B, L] original ids; target_mask [B, L] bool -> scalar.

    Mean over picked tokens (0 if none), as MUMC's BertForMaskedLM with soft labels.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    hard = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    soft = -jnp.sum(logp * jax.lax.stop_gradient(jax.nn.softmax(logits_m.astype(jnp.float32), -1)), -1)
    per_token = (1.0 - alpha) * hard + alpha * soft
    w = target_mask.astype(jnp.float32)
    return jnp.sum(per_token * w) / jnp.maximum(jnp.sum(w), 1.0)


def answer_lm_loss(logits, logits_m, answer_ids, answer_mask, alpha):
    """Answer-decoder LM loss per answer (ALBEF/MUMC BertLMHeadModel, reduction='none'): -> [N].

    logits/logits_m [N, La, V] at the decoder inputs answer_ids [N, La] ([CLS] a1 .. [SEP] [PAD]..); position t
    predicts token t+1, padded targets (answer_mask 0) carry no loss; summed over tokens,
    (1 - alpha) * CE + alpha * soft CE against softmax(momentum logits). Callers average over questions.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = answer_ids[:, 1:].astype(jnp.int32)
    valid = answer_mask[:, 1:].astype(jnp.float32)
    hard = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    soft = -jnp.sum(logp * jax.lax.stop_gradient(jax.nn.softmax(logits_m[:, :-1].astype(jnp.float32), -1)), -1)
    return jnp.sum(((1.0 - alpha) * hard + alpha * soft) * valid, axis=-1)

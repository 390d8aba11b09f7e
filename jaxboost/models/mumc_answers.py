"""MUMC VQA answering: rank the candidate answers for encoded questions."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxboost.losses import mlm
from jaxboost.models.mumc import VQAModel


def rank_answers(model: VQAModel, params, question_states, question_mask, answer_ids, answer_mask, k: int):
    """MUMC's `rank_answer`: keep the k candidates with the highest first-token probability, re-rank them by
    log p(first token) - NLL(whole answer) (the original's score, first token counted in both), softmax.

    question_states [B, Lq, D], question_mask [B, Lq]; answer_ids/mask [A, La] of the candidate list, each
    "[CLS] answer [SEP] [PAD]..". Returns (candidate indices [B, k] best first, scores [B, k]).
    """
    decode = lambda ids, mask, qs, qm: model.apply({"params": params}, ids, mask, qs, qm, method=VQAModel.decode)
    b = question_states.shape[0]
    start = jnp.broadcast_to(answer_ids[:1, :1], (b, 1))
    first_logits = decode(start, jnp.ones_like(start), question_states, question_mask)[:, 0]
    first_prob = jax.nn.softmax(first_logits.astype(jnp.float32), axis=-1)[:, answer_ids[:, 1]]   # [B, A]
    topk_prob, topk_ids = jax.lax.top_k(first_prob, k)
    ids, mask = answer_ids[topk_ids].reshape(b * k, -1), answer_mask[topk_ids].reshape(b * k, -1)
    logits = decode(ids, mask, jnp.repeat(question_states, k, axis=0), jnp.repeat(question_mask, k, axis=0))
    nll = mlm.answer_lm_loss(logits, logits, ids, mask, 0.0).reshape(b, k)
    scores = jax.nn.softmax(jnp.log(topk_prob) - nll, axis=-1)
    scores, order = jax.lax.top_k(scores, k)
    return jnp.take_along_axis(topk_ids, order, axis=1), scores

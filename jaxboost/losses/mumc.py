"""MUMC's losses as pure functions of (model, params, momentum params, queues, batch, rng): the pretraining
total MLM + ITA + ITM (Li et al. 2023) and the VQA answer LM loss distilled from the momentum model."""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxboost.losses import contrastive, matching, mlm

if TYPE_CHECKING:   # the model module re-exports these losses, so it is not imported at run time here
    from jaxboost.models.mumc import Model, VQAModel


def keep_indices(rng, batch: int, num_patches: int, drop_ratio: float):
    """MAE's random masking: [B, K] kept patch indices, K = int(N * (1 - ratio)) as MUMC (217 of 256)."""
    keep = int(num_patches * (1.0 - drop_ratio))
    noise = jax.random.uniform(rng, (batch, num_patches))
    return jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1)


def pretrain_losses(model: Model, params, momentum_params, queues, batch, rng, alpha, *,
                    mask_token_id: int, special_token_ids, patch_drop: float = 0.15,
                    mlm_probability: float = 0.15, deterministic: bool = False, draws=None,
                    teacher_params=None, teacher_deterministic: bool | None = None):
    """One MUMC pretraining loss: total = MLM + ITA + ITM.

    batch: images [B, H, W, 3], input_ids [B, L], mask [B, L]. Call under `jax.jit` with the batch sharded
    over the data axis: the arrays are global, so similarities, hard negatives and queue writes span the
    global batch and XLA inserts the gathers (with gradient for the online features).
    Returns (total, {"mlm", "ita", "itm", "i2t", "t2i", "i2i", "t2t", "temp"}, (image_feat_m, text_feat_m));
    the caller passes the last pair to `enqueue` and, after the optimizer step, applies `clamp_params`; the
    momentum tree to keep is `momentum_update(params, momentum_params)` of this step's (pre-update) params.
    `draws` may fix any random choice (for parity tests): keep, keep_m [B, K]; masked_ids, target [B, L];
    neg_img, neg_txt [B]. Whatever it lacks is drawn from `rng`.
    `teacher_params`: the momentum tree of the MLM teacher's text encoder (default `momentum_params`). MUMC's
    get_contrastive_loss runs the EMA step after the momentum features and before get_mlm_loss, so its MLM
    teacher reads the post-EMA text encoder over the pre-EMA image tokens: pass the EMA'd tree here.
    `teacher_deterministic` (default `deterministic`): False runs the momentum model with dropout, as MUMC's
    teachers do (they are in train mode with the rest of the model).
    """
    cls = type(model)   # its methods, for apply(..., method=...)
    draws = dict(draws or {})
    images, ids, mask = batch["images"], batch["input_ids"], batch["mask"]
    b = images.shape[0]
    num_patches = (images.shape[1] // model.patch_size) * (images.shape[2] // model.patch_size)
    r_keep, r_keep_m, r_mlm, r_neg, r_drop = jax.random.split(rng, 5)
    if "keep" not in draws:
        draws["keep"] = keep_indices(r_keep, b, num_patches, patch_drop) if patch_drop > 0 else None
    if "keep_m" not in draws:
        draws["keep_m"] = keep_indices(r_keep_m, b, num_patches, patch_drop) if patch_drop > 0 else None
    keep, keep_m = draws["keep"], draws["keep_m"]
    calls = iter(range(1 << 20))  # a fresh dropout key per apply call
    run = lambda method, *a: model.apply({"params": params}, *a, deterministic=deterministic, method=method,
                                         rngs={"dropout": jax.random.fold_in(r_drop, next(calls))})
    # setup() creates `temp` eagerly, so the momentum tree borrows it (momentum methods never read it).
    teacher_det = deterministic if teacher_deterministic is None else teacher_deterministic
    r_drop_m = jax.random.fold_in(r_drop, 1 << 21)
    calls_m = iter(range(1 << 20))

    def run_m(method, *a, tree=momentum_params):
        return jax.lax.stop_gradient(model.apply(
            {"params": dict(tree, temp=params["temp"])}, *a, deterministic=teacher_det, method=method,
            rngs={"dropout": jax.random.fold_in(r_drop_m, next(calls_m))}))

    image_tokens, image_feat = run(cls.encode_image, images, keep)
    text_hidden, text_feat = run(cls.encode_text, ids, mask)
    image_tokens_m, image_feat_m = run_m(cls.encode_image, images, keep_m)
    _, text_feat_m = run_m(cls.encode_text, ids, mask)
    temp = contrastive.clamp_temperature(params["temp"])

    loss_ita, terms = contrastive.ita_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                           queues["image"], queues["text"], temp, alpha)

    # ITM: positives, then (text, hard negative image) and (hard negative text, image).
    if "neg_img" not in draws:
        draws["neg_img"], draws["neg_txt"] = matching.itm_hard_negatives(r_neg, image_feat, text_feat, temp)
    neg_img, neg_txt = draws["neg_img"], draws["neg_txt"]
    fused_pos = run(cls.fuse, text_hidden, mask, image_tokens)
    fused_neg = run(cls.fuse, jnp.concatenate([text_hidden, text_hidden[neg_txt]]),
                    jnp.concatenate([mask, mask[neg_txt]]),
                    jnp.concatenate([image_tokens[neg_img], image_tokens]))
    loss_itm = matching.itm_loss(run(cls.itm_logits, fused_pos[:, 0]), run(cls.itm_logits, fused_neg[:, 0]))

    # MLM on the masked view of the image, distilled from the momentum model's logits.
    if "masked_ids" not in draws:
        draws["masked_ids"], draws["target"] = mlm.mask_tokens(r_mlm, ids, model.vocab_size, mask_token_id,
                                                               special_token_ids, mlm_probability)
    masked_ids, target = draws["masked_ids"], draws["target"]
    logits = run(cls.mlm_logits, run(cls.fuse, run(cls.encode_text, masked_ids, mask)[0], mask,
                                       image_tokens))
    teacher = momentum_params if teacher_params is None else teacher_params
    hidden_m = run_m(cls.encode_text, masked_ids, mask, tree=teacher)[0]
    logits_m = run_m(cls.mlm_logits, run_m(cls.fuse, hidden_m, mask, image_tokens_m, tree=teacher), tree=teacher)
    loss_mlm = mlm.mlm_distill_loss(logits, logits_m, ids, target, alpha)

    total = loss_mlm + loss_ita + loss_itm
    terms = dict(terms, mlm=loss_mlm, ita=loss_ita, itm=loss_itm, temp=temp)
    return total, terms, (image_feat_m, text_feat_m)


def vqa_loss(model: VQAModel, params, momentum_params, batch, rng, alpha, deterministic: bool = False,
             teacher_deterministic: bool | None = None):
    """MUMC VQA finetuning loss: answer LM loss distilled from the momentum model (EMA copy of all params),
    summed over answer tokens and averaged over questions (the original's loss.sum() / batch).

    batch: images [B, H, W, 3], question_ids/question_mask [B, Lq], answer_ids/answer_mask [B, La]
    ("[CLS] answer [SEP]", padded). Returns (loss, per-question losses [B]). `teacher_deterministic`
    (default `deterministic`): False runs the momentum model with dropout, as MUMC's (in train mode).
    """
    teacher_det = deterministic if teacher_deterministic is None else teacher_deterministic
    cls = type(model)   # its methods, for apply(..., method=...)
    calls = iter(range(1 << 10))
    run = lambda p, method, *a, det: model.apply({"params": p}, *a, deterministic=det, method=method,
                                                 rngs={"dropout": jax.random.fold_in(rng, next(calls))})
    q, qm, a, am = batch["question_ids"], batch["question_mask"], batch["answer_ids"], batch["answer_mask"]
    states = run(params, cls.encode_question, batch["images"], q, qm, det=deterministic)
    logits = run(params, cls.decode, a, am, states, qm, det=deterministic)
    states_m = run(momentum_params, cls.encode_question, batch["images"], q, qm, det=teacher_det)
    logits_m = jax.lax.stop_gradient(run(momentum_params, cls.decode, a, am, states_m, qm, det=teacher_det))
    per_question = mlm.answer_lm_loss(logits, logits_m, a, am, alpha)
    return jnp.sum(per_question) / a.shape[0], per_question

"""MUMC (Li et al., MICCAI 2023): ViT-B/16 + BERT with fusion layers, for pretraining and medical VQA (SPEC B).

`Model` is the pretraining model: image encoder (timm/MAE ViT, fixed sin-cos position embedding, MAE patch
dropping), BERT whose layers [0, fusion_layer) encode text and [fusion_layer, depth) cross-attend to all
image tokens, 768 -> 256 projections of the class tokens (L2-normalised), a learnable temperature
(init 0.07, clamped to [0.001, 0.5] on use and by `clamp_params` after updates) and the ITM head 768 -> 1536 -> LayerNorm -> GELU -> 2.
Each piece is a method usable with `apply(..., method=...)`: `encode_image`, `encode_text`, `fuse`,
`itm_logits`, `mlm_logits`.

Momentum (EMA 0.995) copies of the image encoder, BERT (with its MLM head) and both projections are a sub-tree
of the params (`momentum_init`); they are applied with the same module (the other entries are never touched).
Queues are plain arrays in a small dict (`init_queues`, `enqueue`), so the whole state is a pytree for the
train state and checkpoints. `pretrain_losses` is the pure loss of one step (SPEC B2); `overlay_params`
starts the text tower from a converted HF BERT.

`VQAModel` is the VQA model: the same image encoder and 12-layer encoder (question fused with the image) plus
the 6-layer answer decoder (causal self-attention, cross-attention to the fused question, LM head)
initialised from encoder layers 6-11 (`vqa_params_from_pretrain`). As in MUMC's VQA model (a timm ViT with a
learned table), the pretraining sin-cos embedding becomes a trainable 16x16 table, interpolated bicubically
at 384 px like MUMC's `interpolate_pos_embed`. `vqa_loss` (distilled answer LM loss) and `rank_answers`
(top-k candidates by first-token probability, re-ranked by likelihood) are pure functions.

Sizes: images [B, H, W, 3] NHWC; ids/masks [B, L]; image tokens [B, 1 + K, Dv]; features [B, E].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxboost.losses import contrastive, matching, mlm
from jaxboost.models import bert, layers, vit

MOMENTUM_KEYS = ("vision", "vision_proj", "text", "text_proj")


class _Sizes(nn.Module):
    """Fields shared by both models (ViT-B/16 + BERT-base by default)."""
    image_size: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    vocab_size: int = 30522
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_mlp_dim: int = 3072
    fusion_layer: int = 6
    max_position: int = 512
    embed_dim: int = 256
    temp_init: float = 0.07
    dropout_rate: float = 0.1            # BERT hidden/attention dropout; the ViT has none (MAE)
    attention_impl: str = "einsum"
    remat: bool = False
    dtype: layers.Dtype | None = None

    def _vision(self, posemb: str = "sincos2d", table_size: int | None = None):
        return vit.Model(width=self.vision_width, depth=self.vision_depth, num_heads=self.vision_heads,
                         mlp_dim=self.vision_mlp_dim, patch_size=self.patch_size,
                         image_size=table_size or self.image_size, activation="gelu", ln_eps=1e-6,
                         patch_bias=True, pre_norm=False, final_norm=True, posemb=posemb,
                         attention_impl=self.attention_impl, remat=self.remat, dtype=self.dtype)

    def _bert(self, **overrides):
        kw = dict(vocab_size=self.vocab_size, hidden=self.text_width, depth=self.text_depth,
                  num_heads=self.text_heads, mlp_dim=self.text_mlp_dim, max_position=self.max_position,
                  fusion_layer=self.fusion_layer, dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.dropout_rate, attention_impl=self.attention_impl,
                  remat=self.remat, dtype=self.dtype)
        return bert.Model(**{**kw, **overrides})


class Model(_Sizes):
    """MUMC pretraining model. `vision_posemb`: "sincos2d" computes MAE's fixed table; "table" holds it as a
    `vision/pos_embedding` param (sin-cos initialised) that a checkpoint may overwrite, as MUMC's
    load_checkpoint copies ALBEF.pth's learned table into MAE's frozen `pos_embed` (the trainer freezes it)."""
    vision_posemb: str = "sincos2d"

    def setup(self):
        if self.vision_posemb not in ("sincos2d", "table"):
            raise ValueError(f"vision_posemb must be 'sincos2d' or 'table', got {self.vision_posemb!r}")
        self.vision = self._vision("learned" if self.vision_posemb == "table" else "sincos2d")
        self.text = self._bert(mlm_head=True)
        self.vision_proj = nn.Dense(self.embed_dim, dtype=self.dtype)
        self.text_proj = nn.Dense(self.embed_dim, dtype=self.dtype)
        self.temp = self.param("temp", nn.initializers.constant(self.temp_init), ())
        self.itm_fc1 = nn.Dense(2 * self.text_width, dtype=self.dtype)
        self.itm_ln = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)   # torch nn.LayerNorm default
        self.itm_fc2 = nn.Dense(2, dtype=self.dtype)

    def encode_image(self, images, keep_idx=None, deterministic: bool = True):
        """images [B, H, W, 3], keep_idx [B, K] or None -> (tokens [B, 1+K, Dv], feature [B, E] unit norm)."""
        tokens = self.vision(images, keep_idx, deterministic=deterministic)
        return tokens, _l2_normalize(self.vision_proj(tokens[:, 0]))

    def encode_text(self, input_ids, mask, deterministic: bool = True):
        """ids/mask [B, L] -> (text-layer states [B, L, D], feature [B, E] unit norm)."""
        hidden = self.text.text(input_ids, mask, deterministic=deterministic)
        return hidden, _l2_normalize(self.text_proj(hidden[:, 0]))

    def fuse(self, text_hidden, mask, image_tokens, deterministic: bool = True):
        """Fusion layers: text states [B, L, D] attend to all image tokens [B, N, Dv] -> [B, L, D]."""
        return self.text.fuse(text_hidden, mask, image_tokens, deterministic=deterministic)

    def itm_logits(self, fused_cls, deterministic: bool = True):
        """[B, D] class-token state of the fused sequence -> [B, 2] (index 1 = matched).

        (`deterministic` unused: every method takes it so one call helper serves all.)"""
        h = layers.ACTIVATIONS["gelu"](self.itm_ln(self.itm_fc1(fused_cls)))
        return self.itm_fc2(h)

    def mlm_logits(self, hidden, deterministic: bool = True):
        """[B, L, D] -> [B, L, vocab] (MLM head, decoder tied to the word embeddings)."""
        return self.text.mlm_logits(hidden)

    def temperature(self):
        return contrastive.clamp_temperature(self.temp)

    def __call__(self, images, input_ids, mask, keep_idx=None, deterministic: bool = True):
        """Runs every piece (used by init): -> (MLM logits [B, L, V], ITM logits [B, 2], features)."""
        tokens, image_feat = self.encode_image(images, keep_idx, deterministic)
        hidden, text_feat = self.encode_text(input_ids, mask, deterministic)
        fused = self.fuse(hidden, mask, tokens, deterministic)
        return self.mlm_logits(fused), self.itm_logits(fused[:, 0]), (image_feat, text_feat, self.temperature())


def _l2_normalize(x, eps: float = 1e-12):
    # torch F.normalize: x / max(||x||, eps)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ------------------------------------------------------------------------------------ momentum and queues
def momentum_init(params):
    """The momentum copy: image encoder, BERT (with MLM head) and projections, as in MUMC's model_pairs."""
    return jax.tree_util.tree_map(jnp.array, {k: params[k] for k in MOMENTUM_KEYS})


def momentum_update(params, momentum_params, momentum: float = 0.995):
    """EMA: m <- momentum * m + (1 - momentum) * p on the momentum sub-tree (pure)."""
    return jax.tree_util.tree_map(lambda m, p: momentum * m + (1.0 - momentum) * p,
                                  momentum_params, {k: params[k] for k in momentum_params})


def init_queues(rng, size: int, dim: int):
    """Random unit-norm queues [size, dim] (as MUMC's normalised randn) and the write pointer."""
    r_img, r_txt = jax.random.split(rng)
    unit = lambda r: _l2_normalize(jax.random.normal(r, (size, dim), jnp.float32))
    return {"image": unit(r_img), "text": unit(r_txt), "ptr": jnp.zeros((), jnp.int32)}


def enqueue(queues, image_feat, text_feat):
    """Write the (global) momentum features [B, E] at ptr, advance ptr by B modulo the queue size."""
    size, b = queues["image"].shape[0], image_feat.shape[0]
    if size % b:
        raise ValueError(f"queue size {size} must be a multiple of the global batch {b}")
    ptr = queues["ptr"]
    write = lambda q, f: jax.lax.dynamic_update_slice(q, jax.lax.stop_gradient(f).astype(q.dtype), (ptr, 0))
    return {"image": write(queues["image"], image_feat), "text": write(queues["text"], text_feat),
            "ptr": (ptr + b) % size}


def overlay_params(base, loaded, where: str = ""):
    """Deep-merge `loaded` (e.g. HF bert-base converted) over `base` (fresh init): -> (params, paths kept
    from base). A BERT checkpoint has no cross-attention, so MUMC's fusion layers keep their fresh init, as
    ALBEF's; a shape mismatch raises naming the path; a loaded entry unknown to base raises too."""
    kept, out = [], dict(base)
    for k, v in loaded.items():
        path = f"{where}/{k}"
        if k not in base:
            raise ValueError(f"loaded parameter {path} does not exist in the model")
        if isinstance(v, dict):
            out[k], sub = overlay_params(base[k], v, path)
            kept += sub
        else:
            if tuple(np.shape(v)) != tuple(np.shape(base[k])):
                raise ValueError(f"{path}: loaded shape {np.shape(v)} != model shape {np.shape(base[k])}")
            out[k] = jnp.asarray(v, dtype=base[k].dtype)
    kept += [f"{where}/{k}" for k in base if k not in loaded]
    return out, kept


def sincos_table(grid: int, width: int) -> np.ndarray:
    """MAE's fixed table with its class-token row: [1 + grid^2, width]."""
    return np.concatenate([np.zeros((1, width), np.float32), vit.sincos_2d_posemb(grid, width)])


def clamp_params(params, low: float = 0.001, high: float = 0.5):
    """MUMC clamps the temperature parameter in place each step; call after the optimizer update so the
    parameter itself (not only its use) stays in [low, high] and its gradient never dies at the bound."""
    return dict(params, temp=jnp.clip(params["temp"], low, high))


def keep_indices(rng, batch: int, num_patches: int, drop_ratio: float):
    """MAE's random masking: [B, K] kept patch indices, K = int(N * (1 - ratio)) as MUMC (217 of 256)."""
    keep = int(num_patches * (1.0 - drop_ratio))
    noise = jax.random.uniform(rng, (batch, num_patches))
    return jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1)


# ------------------------------------------------------------------------------------------- the loss
def pretrain_losses(model: Model, params, momentum_params, queues, batch, rng, alpha, *,
                    mask_token_id: int, special_token_ids, patch_drop: float = 0.15,
                    mlm_probability: float = 0.15, deterministic: bool = False, draws=None,
                    teacher_params=None, teacher_deterministic: bool | None = None):
    """One MUMC pretraining loss (SPEC B2): total = MLM + ITA + ITM.

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
    # setup() creates `temp` eagerly, so a momentum tree borrows it (momentum methods never read it).
    teacher_det = deterministic if teacher_deterministic is None else teacher_deterministic
    r_drop_m = jax.random.fold_in(r_drop, 1 << 21)
    calls_m = iter(range(1 << 20))

    def run_m(method, *a, tree=momentum_params):
        return jax.lax.stop_gradient(model.apply(
            {"params": dict(tree, temp=params["temp"])}, *a, deterministic=teacher_det, method=method,
            rngs={"dropout": jax.random.fold_in(r_drop_m, next(calls_m))}))

    image_tokens, image_feat = run(Model.encode_image, images, keep)
    text_hidden, text_feat = run(Model.encode_text, ids, mask)
    image_tokens_m, image_feat_m = run_m(Model.encode_image, images, keep_m)
    _, text_feat_m = run_m(Model.encode_text, ids, mask)
    temp = contrastive.clamp_temperature(params["temp"])

    loss_ita, terms = contrastive.ita_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                           queues["image"], queues["text"], temp, alpha)

    # ITM: positives, then (text, hard negative image) and (hard negative text, image).
    if "neg_img" not in draws:
        draws["neg_img"], draws["neg_txt"] = matching.itm_hard_negatives(r_neg, image_feat, text_feat, temp)
    neg_img, neg_txt = draws["neg_img"], draws["neg_txt"]
    fused_pos = run(Model.fuse, text_hidden, mask, image_tokens)
    fused_neg = run(Model.fuse, jnp.concatenate([text_hidden, text_hidden[neg_txt]]),
                    jnp.concatenate([mask, mask[neg_txt]]),
                    jnp.concatenate([image_tokens[neg_img], image_tokens]))
    loss_itm = matching.itm_loss(run(Model.itm_logits, fused_pos[:, 0]), run(Model.itm_logits, fused_neg[:, 0]))

    # MLM on the masked view of the image, distilled from the momentum model's logits.
    if "masked_ids" not in draws:
        draws["masked_ids"], draws["target"] = mlm.mask_tokens(r_mlm, ids, model.vocab_size, mask_token_id,
                                                               special_token_ids, mlm_probability)
    masked_ids, target = draws["masked_ids"], draws["target"]
    logits = run(Model.mlm_logits, run(Model.fuse, run(Model.encode_text, masked_ids, mask)[0], mask,
                                       image_tokens))
    teacher = momentum_params if teacher_params is None else teacher_params
    hidden_m = run_m(Model.encode_text, masked_ids, mask, tree=teacher)[0]
    logits_m = run_m(Model.mlm_logits, run_m(Model.fuse, hidden_m, mask, image_tokens_m, tree=teacher),
                     tree=teacher)
    loss_mlm = mlm.mlm_distill_loss(logits, logits_m, ids, target, alpha)

    total = loss_mlm + loss_ita + loss_itm
    terms = dict(terms, mlm=loss_mlm, ita=loss_ita, itm=loss_itm, temp=temp)
    return total, terms, (image_feat_m, text_feat_m)


# ----------------------------------------------------------------------------------------------- VQA
class VQAModel(_Sizes):
    """MUMC for VQA: fused question encoder + 6-layer causal answer decoder (LM head)."""
    image_size: int = 384
    pretrain_image_size: int = 256      # grid of the stored position embedding (interpolated to image_size)
    decoder_depth: int = 6

    def setup(self):
        # Position table stored at the pretraining grid (sin-cos initialised), resized bicubically.
        self.vision = self._vision("learned", self.pretrain_image_size)
        self.text = self._bert(mlm_head=False)
        self.decoder = self._bert(depth=self.decoder_depth, fusion_layer=0, causal=True,
                                  mlm_head=True)

    def encode_question(self, images, question_ids, question_mask, deterministic: bool = True):
        """images [B, H, W, 3], question [B, Lq] -> fused question states [B, Lq, D]."""
        image_tokens = self.vision(images, deterministic=deterministic)
        hidden = self.text.text(question_ids, question_mask, deterministic=deterministic)
        return self.text.fuse(hidden, question_mask, image_tokens, deterministic=deterministic)

    def decode(self, answer_ids, answer_mask, question_states, question_mask, deterministic: bool = True):
        """Teacher-forced answer logits [B, La, V] (position t predicts token t + 1)."""
        hidden = self.decoder(answer_ids, answer_mask, question_states, question_mask,
                              deterministic=deterministic)
        return self.decoder.mlm_logits(hidden)

    def __call__(self, images, question_ids, question_mask, answer_ids, answer_mask, deterministic=True):
        states = self.encode_question(images, question_ids, question_mask, deterministic)
        return self.decode(answer_ids, answer_mask, states, question_mask, deterministic)


def answer_decoder_from_text_encoder(text_params, first_layer: int = 6, depth: int = 6):
    """ALBEF/MUMC VQA init: decoder embeddings and MLM head from the text encoder, decoder layer i from
    encoder layer first_layer + i (these carry the cross-attention weights the decoder needs)."""
    out = {k: text_params[k] for k in ("embeddings", "mlm_transform", "mlm_ln", "mlm_bias")}
    for i in range(depth):
        out[f"layer{i}"] = text_params[f"layer{first_layer + i}"]
    return jax.tree_util.tree_map(jnp.array, out)


def vqa_params_from_pretrain(pretrain_params, pretrain_grid: int, first_layer: int = 6, decoder_depth: int = 6):
    """Pretraining params -> VQAModel params: ViT with its sin-cos table made explicit, text encoder without
    the MLM head, answer decoder from layers first_layer.. of the text encoder."""
    vision = dict(pretrain_params["vision"])
    if "pos_embedding" not in vision:   # a "table" pretraining model (ALBEF.pth start) already holds one
        vision["pos_embedding"] = jnp.asarray(sincos_table(pretrain_grid, vision["cls_token"].shape[-1]))
    text = {k: v for k, v in pretrain_params["text"].items() if not k.startswith("mlm")}
    return {"vision": vision, "text": text,
            "decoder": answer_decoder_from_text_encoder(pretrain_params["text"], first_layer, decoder_depth)}


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


def vqa_loss(model: VQAModel, params, momentum_params, batch, rng, alpha, deterministic: bool = False,
             teacher_deterministic: bool | None = None):
    """MUMC VQA finetuning loss: answer LM loss distilled from the momentum model (EMA copy of all params),
    summed over answer tokens and averaged over questions (the original's loss.sum() / batch).

    batch: images [B, H, W, 3], question_ids/question_mask [B, Lq], answer_ids/answer_mask [B, La]
    ("[CLS] answer [SEP]", padded). Returns (loss, per-question losses [B]). `teacher_deterministic`
    (default `deterministic`): False runs the momentum model with dropout, as MUMC's (in train mode).
    """
    teacher_det = deterministic if teacher_deterministic is None else teacher_deterministic
    calls = iter(range(1 << 10))
    run = lambda p, method, *a, det: model.apply({"params": p}, *a, deterministic=det, method=method,
                                                 rngs={"dropout": jax.random.fold_in(rng, next(calls))})
    q, qm, a, am = batch["question_ids"], batch["question_mask"], batch["answer_ids"], batch["answer_mask"]
    states = run(params, VQAModel.encode_question, batch["images"], q, qm, det=deterministic)
    logits = run(params, VQAModel.decode, a, am, states, qm, det=deterministic)
    states_m = run(momentum_params, VQAModel.encode_question, batch["images"], q, qm, det=teacher_det)
    logits_m = jax.lax.stop_gradient(run(momentum_params, VQAModel.decode, a, am, states_m, qm, det=teacher_det))
    per_question = mlm.answer_lm_loss(logits, logits_m, a, am, alpha)
    return jnp.sum(per_question) / a.shape[0], per_question

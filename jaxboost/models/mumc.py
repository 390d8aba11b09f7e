"""MUMC (Li et al., MICCAI 2023): ViT-B/16 + BERT with fusion layers, for pretraining and medical VQA.

`Model` is the pretraining model: image encoder (timm/MAE ViT, fixed sin-cos position embedding, MAE patch
dropping), BERT whose layers [0, fusion_layer) encode text and [fusion_layer, depth) cross-attend to all
image tokens, 768 -> 256 projections of the class tokens (L2-normalised), a learnable temperature
(init 0.07, clamped to [0.001, 0.5] on use and by `clamp_params` after updates) and the ITM head 768 -> 1536 -> LayerNorm -> GELU -> 2.
Each piece is a method usable with `apply(..., method=...)`: `encode_image`, `encode_text`, `fuse`,
`itm_logits`, `mlm_logits`.

The rest of MUMC lives by job: momentum copies and queues in `models/mumc_state.py`, parameter surgery
(HF BERT overlay, pretraining -> VQA) in `models/mumc_surgery.py`, answer ranking in `models/mumc_answers.py`,
the pretraining and VQA losses in `losses/mumc.py`; their names are also reachable here (`mumc.pretrain_losses`).

`VQAModel` is the VQA model: the same image encoder and 12-layer encoder (question fused with the image) plus
the 6-layer answer decoder (causal self-attention, cross-attention to the fused question, LM head)
initialised from encoder layers 6-11 (`vqa_params_from_pretrain`). As in MUMC's VQA model (a timm ViT with a
learned table), the pretraining sin-cos embedding becomes a trainable 16x16 table, interpolated bicubically
at 384 px like MUMC's `interpolate_pos_embed`.

Sizes: images [B, H, W, 3] NHWC; ids/masks [B, L]; image tokens [B, 1 + K, Dv]; features [B, E].
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxboost.losses import contrastive
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


# The functions of MUMC's other jobs, by their long-standing `mumc.` names (defined in the modules named above).
from jaxboost.losses.mumc import keep_indices, pretrain_losses, vqa_loss  # noqa: E402
from jaxboost.models.mumc_answers import rank_answers  # noqa: E402
from jaxboost.models.mumc_state import clamp_params, enqueue, init_queues, momentum_init, momentum_update  # noqa: E402
from jaxboost.models.mumc_surgery import (answer_decoder_from_text_encoder, overlay_params,  # noqa: E402
                                          sincos_table, vqa_params_from_pretrain)

__all__ = ["MOMENTUM_KEYS", "Model", "VQAModel", "answer_decoder_from_text_encoder", "clamp_params", "enqueue",
           "init_queues", "keep_indices", "momentum_init", "momentum_update", "overlay_params", "pretrain_losses",
           "rank_answers", "sincos_table", "vqa_loss", "vqa_params_from_pretrain"]

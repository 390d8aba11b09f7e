"""PyTorch reference for MUMC (following pengfeiliHEU/MUMC models/model.py and ALBEF's xbert), for parity
tests and the pretraining-step benchmark. Written from the public code's formulas, not copied.

- `ita_loss`: MUMC's get_contrastive_loss with queues stored [D, Q] as in the original.
- `itm_loss`: get_matching_loss after the fusion encoder, given negative indices (or sampled with
  torch.multinomial from softmax + 1e-4 with the diagonal zeroed).
- `mlm_distill_loss`: xbert BertForMaskedLM loss with soft labels.
- `VisionTransformer`: MAE/timm-style ViT (patch_embed.proj, cls_token, blocks.i.{norm1, attn.qkv, attn.proj,
  norm2, mlp.fc1, mlp.fc2}, norm) with fixed sin-cos position embedding and MAE patch dropping given indices.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- losses
def ita_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha):
    """Queues [D, Q] (the original's layout). Returns (loss, dict of the four terms)."""
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
        sim_targets = torch.zeros(sim_i2t_m.size(), device=sim_i2t_m.device)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2i = image_feat @ image_feat_all / temp
    sim_t2t = text_feat @ text_feat_all / temp
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    terms = {
        "i2i": -torch.sum(F.log_softmax(sim_i2i, dim=1) * sim_targets, dim=1).mean(),
        "t2t": -torch.sum(F.log_softmax(sim_t2t, dim=1) * sim_targets, dim=1).mean(),
        "i2t": -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean(),
        "t2i": -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean(),
    }
    loss = (terms["i2t"] + terms["t2i"] + 0.5 * (terms["i2i"] + terms["t2t"])) / 2
    return loss, terms


def itm_negative_weights(image_feat, text_feat, temp):
    """(weights_i2t, weights_t2i) [B, B]: softmax + 1e-4, diagonal zeroed."""
    with torch.no_grad():
        sim_i2t = image_feat @ text_feat.t() / temp
        sim_t2i = text_feat @ image_feat.t() / temp
        weights_i2t = F.softmax(sim_i2t, dim=1) + 1e-4
        weights_t2i = F.softmax(sim_t2i, dim=1) + 1e-4
        weights_i2t.fill_diagonal_(0)
        weights_t2i.fill_diagonal_(0)
    return weights_i2t, weights_t2i


def itm_sample_negatives(image_feat, text_feat, temp, generator=None):
    """(neg image index per text, neg text index per image), as the original's per-row multinomial."""
    w_i2t, w_t2i = itm_negative_weights(image_feat, text_feat, temp)
    neg_img = torch.multinomial(w_t2i, 1, generator=generator)[:, 0]
    neg_txt = torch.multinomial(w_i2t, 1, generator=generator)[:, 0]
    return neg_img, neg_txt


def itm_loss(vl_pos, vl_neg, itm_head):
    """vl_pos [B, D] CLS of matched pairs, vl_neg [2B, D] CLS of (text, neg image) then (neg text, image)."""
    bs = vl_pos.shape[0]
    vl_output = itm_head(torch.cat([vl_pos, vl_neg], dim=0))
    labels = torch.cat([torch.ones(bs, dtype=torch.long, device=vl_output.device),
                        torch.zeros(2 * bs, dtype=torch.long, device=vl_output.device)])
    return F.cross_entropy(vl_output, labels)


def build_itm_head(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, 2))


def mlm_distill_loss(prediction_scores, logits_m, labels, alpha):
    """labels [B, L] with -100 at unpicked positions (xbert convention)."""
    vocab = prediction_scores.shape[-1]
    masked_lm_loss = F.cross_entropy(prediction_scores.view(-1, vocab), labels.view(-1), ignore_index=-100)
    soft_labels = F.softmax(logits_m, dim=-1)
    loss_distill = -torch.sum(F.log_softmax(prediction_scores, dim=-1) * soft_labels, dim=-1)
    loss_distill = loss_distill[labels != -100].mean()
    return (1 - alpha) * masked_lm_loss + alpha * loss_distill


# ------------------------------------------------------------------------------------------------- ViT
def sincos_2d_posemb(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (w first), without the class-token row: [grid*grid, dim]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1).astype(np.float32)


class Attention(nn.Module):
    sdpa = False  # True: torch.nn.functional.scaled_dot_product_attention (same maths, fused)

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """MAE encoder as used by MUMC (images NCHW). `keep_idx` [B, K] selects patches after the posemb."""

    def __init__(self, img_size=256, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.patch_size = patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x, keep_idx=None, patch_pos=None):
        """`patch_pos` [N, D] replaces the sin-cos table (e.g. MUMC's VQA table interpolated to 384 px)."""
        grid = x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        if patch_pos is None:
            patch_pos = torch.as_tensor(sincos_2d_posemb(x.shape[-1], grid), device=x.device)
        x = x + patch_pos[None]
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # class-token posemb is zero
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ------------------------------------------------------------------------------------- BERT text / fusion
def extended_mask(mask):
    """[B, L] 1/0 -> additive [B, 1, 1, L] as HF/xbert."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def bert_text_fusion(bert, input_ids, mask, image_embeds, fusion_layer, mode="multimodal"):
    """xbert's modes on an HF BertModel built with is_decoder=True, add_cross_attention=True and eager
    attention (explicit non-causal masks): 'text' runs layers [0, fusion_layer), 'multimodal' all layers with
    cross-attention to `image_embeds` from fusion_layer on. Returns the last hidden state [B, L, D]."""
    h = bert.embeddings(input_ids=input_ids)
    ext = extended_mask(mask)
    img_ext = extended_mask(torch.ones(image_embeds.shape[:2], device=image_embeds.device)) \
        if image_embeds is not None else None
    stop = fusion_layer if mode == "text" else len(bert.encoder.layer)
    for i, layer in enumerate(bert.encoder.layer[:stop]):
        cross = image_embeds if i >= fusion_layer else None
        h = layer(h, ext, encoder_hidden_states=cross, encoder_attention_mask=img_ext if cross is not None else None)
        h = h[0] if isinstance(h, tuple) else h
    return h


def interpolate_patch_pos(patch_pos, new_grid):
    """MUMC's interpolate_pos_embed on the patch rows [N, D]: bicubic, align_corners=False."""
    old = int(round(patch_pos.shape[0] ** 0.5))
    grid = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1)


# ------------------------------------------------------------------------------------------------- VQA
def answer_lm_loss(prediction_scores, logits_m, labels, alpha):
    """xbert BertLMHeadModel loss with reduction='none': labels [N, La] (-100 = pad); logits_m already shifted
    ([:, :-1], as return_logits gives them). -> [N]."""
    shifted = prediction_scores[:, :-1, :].contiguous()
    labels = labels[:, 1:].contiguous()
    lm_loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1), reduction="none")
    lm_loss = lm_loss.view(prediction_scores.size(0), -1).sum(1)
    if logits_m is not None:
        loss_distill = -torch.sum(F.log_softmax(shifted, dim=-1) * F.softmax(logits_m, dim=-1), dim=-1)
        loss_distill = (loss_distill * (labels != -100)).sum(1)
        lm_loss = (1 - alpha) * lm_loss + alpha * loss_distill
    return lm_loss


def rank_answer(decoder, question_states, question_atts, answer_ids, answer_atts, k, pad_id):
    """MUMC's rank_answer with an HF BertLMHeadModel (is_decoder, cross-attention) as the answer decoder."""
    num_ques = question_states.size(0)
    start_ids = answer_ids[0, 0].repeat(num_ques, 1)
    logits = decoder(start_ids, encoder_hidden_states=question_states,
                     encoder_attention_mask=question_atts).logits[:, 0, :]
    prob_first_token = F.softmax(logits, dim=1).index_select(dim=1, index=answer_ids[:, 1])
    topk_probs, topk_ids = prob_first_token.topk(k, dim=1)
    input_ids = torch.cat([answer_ids.index_select(0, t) for t in topk_ids], dim=0)
    input_atts = torch.cat([answer_atts.index_select(0, t) for t in topk_ids], dim=0)
    targets = input_ids.masked_fill(input_ids == pad_id, -100)
    states = question_states.repeat_interleave(k, dim=0)   # == the original's tile(x, 0, k)
    atts = question_atts.repeat_interleave(k, dim=0)
    scores = decoder(input_ids, attention_mask=input_atts, encoder_hidden_states=states,
                     encoder_attention_mask=atts).logits
    answer_loss = answer_lm_loss(scores, None, targets, 0.0).view(input_ids.size(0), -1)
    log_probs = torch.cat([topk_probs.view(-1, 1).log(), -answer_loss], dim=1).sum(1).view(num_ques, k)
    topk_probs, rerank_id = F.softmax(log_probs, dim=-1).topk(k, dim=1)
    return torch.gather(topk_ids, 1, rerank_id), topk_probs


# ------------------------------------------------------------------------------- pretraining step (model)
class MUMCPretrain(nn.Module):
    """MUMC's MUMC_Pretrain.forward with its random choices passed in (patch keep indices for the online and
    momentum views, masked ids + labels, hard negative indices), so a JAX run can be compared exactly and the
    benchmark can time the same step. `text_encoder` is an HF BertLMHeadModel built with is_decoder=True,
    add_cross_attention=True, eager attention (run in xbert's text/fusion modes by `bert_text_fusion`).
    Momentum modules are given (copies); queues are [E, Q] buffers as in the original."""

    def __init__(self, visual_encoder, text_encoder, vision_proj, text_proj, itm_head, momentum_modules,
                 image_queue, text_queue, fusion_layer, temp=0.07, momentum=0.995, ema_in_forward=False):
        super().__init__()
        # MUMC's get_contrastive_loss runs _momentum_update after the momentum features were computed, so the
        # MLM teacher (get_mlm_loss) reads the EMA'd text encoder; False: no EMA inside the forward.
        self.ema_in_forward = ema_in_forward
        self.visual_encoder, self.text_encoder = visual_encoder, text_encoder
        self.vision_proj, self.text_proj, self.itm_head = vision_proj, text_proj, itm_head
        (self.visual_encoder_m, self.text_encoder_m, self.vision_proj_m,
         self.text_proj_m) = momentum_modules
        for m in momentum_modules:
            for p in m.parameters():
                p.requires_grad_(False)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.register_buffer("image_queue", image_queue.clone())
        self.register_buffer("text_queue", text_queue.clone())
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.fusion_layer, self.momentum = fusion_layer, momentum

    def _fuse(self, encoder, text_embeds, mask, image_embeds):
        bert, ext = encoder.bert, extended_mask(mask)
        img_ext = extended_mask(torch.ones(image_embeds.shape[:2], device=image_embeds.device))
        h = text_embeds
        for layer in bert.encoder.layer[self.fusion_layer:]:
            h = layer(h, ext, encoder_hidden_states=image_embeds, encoder_attention_mask=img_ext)
            h = h[0] if isinstance(h, tuple) else h
        return h

    def forward(self, image, input_ids, mask, alpha, keep, keep_m, masked_ids, labels, neg_img, neg_txt):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        text_mode = lambda enc, ids: bert_text_fusion(enc.bert, ids, mask, None, self.fusion_layer, "text")
        image_embeds = self.visual_encoder(image, keep)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = text_mode(self.text_encoder, input_ids)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        with torch.no_grad():
            image_embeds_m = self.visual_encoder_m(image, keep_m)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(text_mode(self.text_encoder_m, input_ids)[:, 0]), dim=-1)
        if self.ema_in_forward:
            self.momentum_update()
        loss_ita, _ = ita_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                               self.text_queue, self.temp, alpha)
        # ITM with the given hard negatives
        output_pos = self._fuse(self.text_encoder, text_embeds, mask, image_embeds)
        output_neg = self._fuse(self.text_encoder, torch.cat([text_embeds, text_embeds[neg_txt]]),
                                torch.cat([mask, mask[neg_txt]]),
                                torch.cat([image_embeds[neg_img], image_embeds]))
        loss_itm = itm_loss(output_pos[:, 0], output_neg[:, 0], self.itm_head)
        # MLM distilled from the momentum model
        with torch.no_grad():
            hidden_m = self._fuse(self.text_encoder_m, text_mode(self.text_encoder_m, masked_ids), mask,
                                  image_embeds_m)
            logits_m = self.text_encoder_m.cls(hidden_m)
        hidden = self._fuse(self.text_encoder, text_mode(self.text_encoder, masked_ids), mask, image_embeds)
        loss_mlm = mlm_distill_loss(self.text_encoder.cls(hidden), logits_m, labels, alpha)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)
        return loss_mlm, loss_ita, loss_itm

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat):
        b, ptr = image_feat.shape[0], int(self.queue_ptr)
        self.image_queue[:, ptr:ptr + b] = image_feat.T
        self.text_queue[:, ptr:ptr + b] = text_feat.T
        self.queue_ptr[0] = (ptr + b) % self.image_queue.shape[1]

    @torch.no_grad()
    def momentum_update(self):
        pairs = [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                 (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]
        for online, mom in pairs:
            for p, pm in zip(online.parameters(), mom.parameters()):
                pm.data = pm.data * self.momentum + p.data * (1.0 - self.momentum)

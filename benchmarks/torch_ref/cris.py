"""PyTorch reference for CRIS (Wang et al. 2022) following DerrickWang005/CRIS.pytorch (model/segmenter.py,
model/layers.py), rewritten with the same parameter names so CRIS checkpoints load. NCHW, as upstream.

Differences, each an option: `pad_mode="fixed"` masks padded words from the attention mask (upstream
tests `word == 0`, which never fires with a tokenizer that pads with <|endoftext|>: pass `pad_mode=
"original"`); the forward returns logits [B, 1, h/4, w/4] and leaves losses to the caller.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_ref.clip_rn50 import CLIP


def conv_layer(in_dim, out_dim, kernel_size=1, padding=0, stride=1):
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding, bias=False),
                         nn.BatchNorm2d(out_dim), nn.ReLU(True))


def linear_layer(in_dim, out_dim, bias=False):
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias), nn.BatchNorm1d(out_dim), nn.ReLU(True))


class CoordConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1, stride=1):
        super().__init__()
        self.conv1 = conv_layer(in_channels + 2, out_channels, kernel_size, padding, stride)

    def forward(self, x):
        b, _, h, w = x.shape
        line = lambda n: torch.linspace(-1, 1, n, device=x.device)
        y, xx = torch.meshgrid(line(h), line(w), indexing="ij")
        coords = torch.stack([xx, y])[None].expand(b, -1, -1, -1)
        return self.conv1(torch.cat([x, coords], 1))


class Projector(nn.Module):
    def __init__(self, word_dim=1024, in_dim=256, kernel_size=3):
        super().__init__()
        self.in_dim, self.kernel_size = in_dim, kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"), conv_layer(in_dim * 2, in_dim * 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"), conv_layer(in_dim * 2, in_dim, 3, padding=1),
            nn.Conv2d(in_dim, in_dim, 1))
        self.txt = nn.Linear(word_dim, in_dim * kernel_size * kernel_size + 1)

    def forward(self, x, word):
        x = self.vis(x)
        b, c, h, w = x.shape
        word = self.txt(word)
        weight = word[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=self.kernel_size // 2, groups=b,
                       bias=word[:, -1])
        return out.transpose(0, 1)


def pos1d(d_model, length, device=None):
    pe = torch.zeros(length, d_model, device=device)
    position = torch.arange(0, length, device=device).unsqueeze(1).float()
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float, device=device) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe.unsqueeze(1)


def pos2d(d_model, height, width, device=None):
    pe = torch.zeros(d_model, height, width, device=device)
    d = d_model // 2
    div = torch.exp(torch.arange(0., d, 2, device=device) * -(math.log(10000.0) / d))
    pos_w = torch.arange(0., width, device=device).unsqueeze(1)
    pos_h = torch.arange(0., height, device=device).unsqueeze(1)
    pe[0:d:2] = torch.sin(pos_w * div).transpose(0, 1).unsqueeze(1).repeat(1, height, 1)
    pe[1:d:2] = torch.cos(pos_w * div).transpose(0, 1).unsqueeze(1).repeat(1, height, 1)
    pe[d::2] = torch.sin(pos_h * div).transpose(0, 1).unsqueeze(2).repeat(1, 1, width)
    pe[d + 1::2] = torch.cos(pos_h * div).transpose(0, 1).unsqueeze(2).repeat(1, 1, width)
    return pe.reshape(-1, 1, height * width).permute(2, 1, 0)


class TransformerDecoderLayer(nn.Module):
    # need_weights=False lets nn.MultiheadAttention run scaled_dot_product_attention (the same softmax
    # attention, fused); True (CRIS.pytorch's default call) forms the weights explicitly.
    sdpa = False

    def __init__(self, d_model=512, nhead=8, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, kdim=d_model, vdim=d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(True), nn.Dropout(dropout),
                                 nn.LayerNorm(dim_feedforward), nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, vis, txt, vis_pos, txt_pos, pad_mask):
        v = self.norm1(vis)
        q = k = v + vis_pos
        weights = not self.sdpa
        vis = vis + self.dropout1(self.self_attn_norm(self.self_attn(q, k, value=v, need_weights=weights)[0]))
        v = self.norm2(vis)
        v = self.multihead_attn(query=v + vis_pos, key=txt + txt_pos, value=txt, key_padding_mask=pad_mask,
                                need_weights=weights)[0]
        vis = vis + self.dropout2(self.cross_attn_norm(v))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class TransformerDecoder(nn.Module):
    def __init__(self, num_layers, d_model, nhead, dim_ffn, dropout):
        super().__init__()
        self.layers = nn.ModuleList([TransformerDecoderLayer(d_model, nhead, dim_ffn, dropout)
                                     for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis, txt, pad_mask):
        b, c, h, w = vis.shape
        vis_pos, txt_pos = pos2d(c, h, w, vis.device), pos1d(txt.shape[-1], txt.shape[1], vis.device)
        out = vis.reshape(b, c, -1).permute(2, 0, 1)
        txt = txt.permute(1, 0, 2)
        for layer in self.layers:
            out = layer(out, txt, vis_pos, txt_pos, pad_mask)
        return self.norm(out).permute(1, 2, 0)


class FPN(nn.Module):
    def __init__(self, in_channels=(512, 1024, 1024), out_channels=(256, 512, 1024)):
        super().__init__()
        self.txt_proj = linear_layer(in_channels[2], out_channels[2])
        self.f1_v_proj = conv_layer(in_channels[2], out_channels[2], 1, 0)
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(out_channels[2]), nn.ReLU(True))
        self.f2_v_proj = conv_layer(in_channels[1], out_channels[1], 3, 1)
        self.f2_cat = conv_layer(out_channels[2] + out_channels[1], out_channels[1], 1, 0)
        self.f3_v_proj = conv_layer(in_channels[0], out_channels[0], 3, 1)
        self.f3_cat = conv_layer(out_channels[0] + out_channels[1], out_channels[1], 1, 0)
        self.f4_proj5 = conv_layer(out_channels[2], out_channels[1], 3, 1)
        self.f4_proj4 = conv_layer(out_channels[1], out_channels[1], 3, 1)
        self.f4_proj3 = conv_layer(out_channels[1], out_channels[1], 3, 1)
        self.aggr = conv_layer(3 * out_channels[1], out_channels[1], 1, 0)
        self.coordconv = nn.Sequential(CoordConv(out_channels[1], out_channels[1], 3, 1),
                                       conv_layer(out_channels[1], out_channels[1], 3, 1))

    def forward(self, imgs, state):
        v3, v4, v5 = imgs
        state = self.txt_proj(state)[:, :, None, None]
        f5 = self.norm_layer(self.f1_v_proj(v5) * state)
        f4 = self.f2_cat(torch.cat([self.f2_v_proj(v4), F.interpolate(f5, scale_factor=2, mode="bilinear")], 1))
        f3 = self.f3_cat(torch.cat([F.avg_pool2d(self.f3_v_proj(v3), 2, 2), f4], 1))
        fq5 = F.interpolate(self.f4_proj5(f5), scale_factor=2, mode="bilinear")
        fq = self.aggr(torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), fq5], 1))
        return self.coordconv(fq)


class CRIS(nn.Module):
    def __init__(self, clip_kwargs=None, fpn_in=(512, 1024, 1024), fpn_out=(256, 512, 1024), num_layers=3,
                 vis_dim=512, num_head=8, dim_ffn=2048, dropout=0.1, word_dim=1024, pad_mode="fixed"):
        super().__init__()
        self.backbone = CLIP(**(clip_kwargs or {}), pool="cris")
        self.neck = FPN(fpn_in, fpn_out)
        self.decoder = TransformerDecoder(num_layers, vis_dim, num_head, dim_ffn, dropout)
        self.proj = Projector(word_dim, vis_dim // 2, 3)
        self.pad_mode = pad_mode

    def forward(self, img, word, attention_mask=None):
        """img [B, 3, H, W], word [B, L] ids -> logits [B, 1, H/4, W/4]."""
        if self.pad_mode == "original" or attention_mask is None:
            pad_mask = word == 0
        else:
            pad_mask = attention_mask == 0
        vis = self.backbone.encode_image(img)
        word, state = self.backbone.encode_text(word)
        fq = self.neck(vis, state)
        b, c, h, w = fq.shape
        fq = self.decoder(fq, word, pad_mask).reshape(b, c, h, w)
        return self.proj(fq, state)

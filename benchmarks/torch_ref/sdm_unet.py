"""PyTorch reference of the SDM U-Net and its samplers, written after the public SDM / guided-diffusion code.

Module and parameter names match upstream (`input_blocks.i.j.in_layers.2.weight`, `...in_norm.mlp_shared.0`,
`time_embed.0`, `out.2`, ...), so an upstream SDM checkpoint loads with `load_state_dict`, and a state dict of
this module is what `jaxboost convert sdm` reads. NCHW, labels one-hot [B, L, H, W].
Also: improved-diffusion's diffusion maths (float64 numpy tables) and the reference sampling loops (ancestral
DDPM with learned-range variance, DDIM with eta) with SDM's classifier-free guidance, used by the benchmark.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Upsample(nn.Module):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.op(x)


class SPADEGroupNorm(nn.Module):
    def __init__(self, norm_nc, label_nc, hidden=128):
        super().__init__()
        self.norm = nn.GroupNorm(32, norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def forward(self, x, segmap):
        x = self.norm(x)
        segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return x * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class ResBlock(nn.Module):
    """Encoder block (plain GroupNorm32)."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=True,
                 up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if self.out_channels == channels
                                else nn.Conv2d(channels, self.out_channels, 1))

    def forward(self, x, cond, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class SDMResBlock(nn.Module):
    """Middle/decoder block: both norms are SPADE group norms of the label map."""

    def __init__(self, channels, emb_channels, dropout, c_channels, out_channels=None, use_scale_shift_norm=True,
                 up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = SPADEGroupNorm(channels, c_channels)
        self.in_layers = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_norm = SPADEGroupNorm(self.out_channels, c_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if self.out_channels == channels
                                else nn.Conv2d(channels, self.out_channels, 1))

    def forward(self, x, cond, emb):
        h = self.in_norm(x, cond)
        if self.updown:
            h = self.in_layers[:-1](h)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(h)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_norm(h, cond) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out, cond)
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Fused-qkv attention. Heads: channels // num_head_channels, or num_heads if num_head_channels == -1.
    Legacy order (QKVAttentionLegacy): heads split before q/k/v; new order (QKVAttention): q/k/v first.
    `sdpa`: torch.nn.functional.scaled_dot_product_attention (the same softmax(q k^T / sqrt(ch)) v, fused)."""
    sdpa = False

    def __init__(self, channels, num_head_channels=64, num_heads=1, use_new_attention_order=False):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.new_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x, cond=None, emb=None):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        bs, width, length = qkv.shape
        ch = width // (3 * self.num_heads)
        if self.new_order:
            q, k, v = (a.reshape(bs * self.num_heads, ch, length) for a in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(bs * self.num_heads, ch * 3, length).split(ch, dim=1)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            a = a.transpose(1, 2).reshape(bs, -1, length)
        else:
            scale = 1 / math.sqrt(math.sqrt(ch))
            w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
            w = torch.softmax(w.float(), dim=-1).type(w.dtype)
            a = torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)
        return (x + self.proj_out(a)).reshape(b, c, *spatial)


class CondSequential(nn.Sequential):
    checkpoint = False  # guided-diffusion's use_checkpoint: recompute each block's activations in backward

    def forward(self, x, cond, emb):
        for layer in self:
            if not isinstance(layer, (ResBlock, SDMResBlock, AttentionBlock)):
                x = layer(x)
            elif self.checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cond, emb, use_reentrant=False)
            else:
                x = layer(x, cond, emb)
        return x


def use_checkpoint(model: nn.Module, on: bool = True) -> nn.Module:
    """Per-block activation checkpointing (guided-diffusion's use_checkpoint), as jaxboost's remat "full"."""
    for m in model.modules():
        if isinstance(m, CondSequential):
            m.checkpoint = on
    return model


class UNetModel(nn.Module):
    """SDM's UNetModel; attention_resolutions here are downsample factors (upstream convention)."""

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 num_classes, dropout=0.0, channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64,
                 use_scale_shift_norm=True, resblock_updown=True, conv_resample=True, num_heads=1,
                 num_heads_upsample=-1, use_new_attention_order=False):
        super().__init__()
        up_heads = num_heads if num_heads_upsample == -1 else num_heads_upsample
        attention = lambda ch, heads=num_heads: AttentionBlock(ch, num_head_channels, heads, use_new_attention_order)
        self.model_channels = model_channels
        temb = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([CondSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, temb, dropout, int(mult * model_channels), use_scale_shift_norm)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(CondSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(CondSequential(
                    ResBlock(ch, temb, dropout, ch, use_scale_shift_norm, down=True) if resblock_updown
                    else Downsample(ch, conv_resample)))
                chans.append(ch)
                ds *= 2
        self.middle_block = CondSequential(
            SDMResBlock(ch, temb, dropout, num_classes, use_scale_shift_norm=use_scale_shift_norm),
            attention(ch),
            SDMResBlock(ch, temb, dropout, num_classes, use_scale_shift_norm=use_scale_shift_norm))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = chans.pop()
                layers = [SDMResBlock(ch + ich, temb, dropout, num_classes, int(model_channels * mult),
                                      use_scale_shift_norm)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, up_heads))
                if level and i == num_res_blocks:
                    layers.append(SDMResBlock(ch, temb, dropout, num_classes, ch, use_scale_shift_norm, up=True)
                                  if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(CondSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, y):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, y, emb)
            hs.append(h)
        h = self.middle_block(h, y, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), y, emb)
        return self.out(h)


def unet_from_config(model_config) -> UNetModel:
    """Build the reference from a jaxboost `config.model` (attention given in pixels, as ours)."""
    c = model_config
    return UNetModel(
        in_channels=c.in_channels, model_channels=c.model_channels,
        out_channels=2 * c.in_channels if c.learn_sigma else c.in_channels, num_res_blocks=c.num_res_blocks,
        attention_resolutions=tuple(c.image_size // r for r in c.attention_resolutions), num_classes=c.num_labels,
        dropout=c.dropout, channel_mult=tuple(c.channel_mult), num_head_channels=c.num_head_channels,
        use_scale_shift_norm=c.use_scale_shift_norm, resblock_updown=c.resblock_updown,
        num_heads=c.get("num_heads", 1), num_heads_upsample=c.get("num_heads_upsample", -1),
        use_new_attention_order=c.get("use_new_attention_order", False))


# ------------------------------------------------------------------------ diffusion (improved-diffusion)
class GaussianDiffusion:
    """Float64 tables of improved-diffusion for given betas, with an optional respacing (kept timesteps)."""

    def __init__(self, betas, use_timesteps=None):
        betas = np.asarray(betas, np.float64)
        if use_timesteps is not None:
            acp_full, last, new = np.cumprod(1 - betas), 1.0, []
            for i in sorted(use_timesteps):
                new.append(1 - acp_full[i] / last)
                last = acp_full[i]
            betas, self.timestep_map = np.array(new), np.array(sorted(use_timesteps))
        else:
            self.timestep_map = np.arange(len(betas))
        self.betas, self.num_timesteps = betas, len(betas)
        acp = np.cumprod(1 - betas)
        self.alphas_cumprod, self.alphas_cumprod_prev = acp, np.append(1.0, acp[:-1])
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - acp)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1 - acp)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * np.sqrt(1 - betas) / (1 - acp)

    def _x(self, arr, t, x):
        picked = torch.as_tensor(arr, dtype=torch.float64, device="cpu")[t.cpu()].float()  # float64 tables on the host
        return picked.to(x.device).view(-1, *([1] * (x.dim() - 1)))

    def p_mean_variance(self, model, x, t, y, s=None, clip_denoised=True):
        """SDM's p_mean_variance: guidance on the eps channels, variance from the conditional output."""
        c = x.shape[1]
        ts = torch.as_tensor(self.timestep_map[t.cpu().numpy()], device=x.device)
        out = model(x, ts, y)
        if s is not None:
            out_zero = model(x, ts, torch.zeros_like(y))
            out = torch.cat([out_zero[:, :c] + s * (out[:, :c] - out_zero[:, :c]), out[:, c:]], dim=1)
        eps, var_values = out[:, :c], out[:, c:]
        min_log = self._x(self.posterior_log_variance_clipped, t, x)
        max_log = self._x(np.log(self.betas), t, x)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        acp = self._x(self.alphas_cumprod, t, x)
        x0 = (x - torch.sqrt(1 - acp) * eps) / torch.sqrt(acp)
        x0 = x0.clamp(-1, 1) if clip_denoised else x0
        mean = self._x(self.posterior_mean_coef1, t, x) * x0 + self._x(self.posterior_mean_coef2, t, x) * x
        return mean, log_var, x0

    @torch.no_grad()
    def p_sample_loop(self, model, noise, y, s=None, noise_fn=None):
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            mean, log_var, _ = self.p_mean_variance(model, x, t, y, s)
            z = noise_fn(i) if noise_fn else torch.randn_like(x)
            x = mean + (i > 0) * torch.exp(0.5 * log_var) * z
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model, noise, y, s=None, eta=0.0, noise_fn=None):
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            _, _, x0 = self.p_mean_variance(model, x, t, y, s)
            acp, acp_prev = self._x(self.alphas_cumprod, t, x), self._x(self.alphas_cumprod_prev, t, x)
            eps = (x - torch.sqrt(acp) * x0) / torch.sqrt(1 - acp)
            sigma = eta * torch.sqrt((1 - acp_prev) / (1 - acp)) * torch.sqrt(1 - acp / acp_prev)
            x = x0 * torch.sqrt(acp_prev) + torch.sqrt(1 - acp_prev - sigma ** 2) * eps
            if eta > 0 and i > 0:
                x = x + sigma * (noise_fn(i) if noise_fn else torch.randn_like(x))
        return x

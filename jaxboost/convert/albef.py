"""ALBEF/MUMC PyTorch checkpoint (.pth via torch.load(weights_only=True), or .safetensors) -> MUMC params.

Pretraining checkpoints carry `visual_encoder.*` (MAE/timm ViT), `text_encoder.bert.*` + `text_encoder.cls.*`
(xbert BertForMaskedLM, cross-attention in layers >= fusion_layer), `vision_proj`, `text_proj`, `temp`,
`itm_head.{0,1,3}`, the momentum copies (`*_m`), `image_queue`/`text_queue` [E, Q] and `queue_ptr`.
VQA checkpoints carry `text_encoder.*` (BertModel) and `text_decoder.bert.*` + `text_decoder.cls.*`.
Every tensor is mapped or named: a missing one raises, unmapped ones are returned (and printed by the CLI).
"""
from __future__ import annotations

import argparse

import numpy as np

from jaxboost.convert.bert import _Taker, bert_params_from_state_dict, load_state_dict, save_params
from jaxboost.models import mumc_surgery


def vit_params_from_state_dict(take: _Taker, prefix: str, depth: int) -> dict:
    """timm/MAE ViT (`patch_embed.proj`, `cls_token`, `blocks.i.*`, `norm`) -> jaxboost.models.vit params."""
    params = {"patch_embed": {"kernel": take(prefix + "patch_embed.proj.weight").transpose(2, 3, 1, 0),
                              "bias": take(prefix + "patch_embed.proj.bias")},
              "cls_token": take(prefix + "cls_token").reshape(-1),
              "ln_post": take.ln(prefix + "norm")}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        qkv_w, qkv_b = take(b + "attn.qkv.weight"), take(b + "attn.qkv.bias")
        d = qkv_w.shape[1]
        attn = {name: {"kernel": qkv_w[j * d:(j + 1) * d].T, "bias": qkv_b[j * d:(j + 1) * d]}
                for j, name in enumerate(("query", "key", "value"))}
        attn["out"] = take.dense(b + "attn.proj")
        params[f"block{i}"] = {"ln1": take.ln(b + "norm1"), "attn": attn, "ln2": take.ln(b + "norm2"),
                               "mlp": {"fc1": take.dense(b + "mlp.fc1"), "fc2": take.dense(b + "mlp.fc2")}}
    return params


def depth_of(sd, pattern_prefix: str, part: str) -> int:
    idx = {int(k[len(pattern_prefix):].split(".")[0]) for k in sd if k.startswith(pattern_prefix)}
    if not idx:
        raise ValueError(f"checkpoint has no {part} tensors ({pattern_prefix}*)")
    return max(idx) + 1


def _fusion_layer(sd, prefix: str, depth: int) -> int:
    cross = [i for i in range(depth) if f"{prefix}encoder.layer.{i}.crossattention.self.query.weight" in sd]
    return min(cross) if cross else depth


def _position_table(take: _Taker, name: str, width: int):
    """None when the checkpoint's table is MAE's fixed sin-cos one (our ViT computes it), else the table
    [1 + N, D]: ALBEF.pth's learned one, which MUMC's `load_checkpoint` copies into its frozen `pos_embed`
    (the model then holds it as a frozen `pos_embedding`, `vision_posemb="table"`)."""
    if not take.has(name):
        return None
    table = take(name).reshape(-1, width)
    grid = int(round((table.shape[0] - 1) ** 0.5))
    sincos = mumc_surgery.sincos_table(grid, width)
    return None if table.shape == sincos.shape and np.allclose(table, sincos, atol=1e-4) else table


def _pretrain_tree(take: _Taker, suffix: str) -> dict:
    """Online (suffix '') or momentum (suffix '_m') sub-trees."""
    v, t = f"visual_encoder{suffix}.", f"text_encoder{suffix}."
    depth_v = depth_of(take.sd, v + "blocks.", "ViT block")
    depth_t = depth_of(take.sd, t + "bert.encoder.layer.", "BERT layer")
    vision = vit_params_from_state_dict(take, v, depth_v)
    table = _position_table(take, v + "pos_embed", vision["cls_token"].shape[-1])
    if table is not None:
        vision["pos_embedding"] = table
    text = bert_params_from_state_dict(take, t + "bert.", depth_t, _fusion_layer(take.sd, t + "bert.", depth_t),
                                       mlm_prefix=t + "cls.")
    return {"vision": vision, "vision_proj": take.dense(f"vision_proj{suffix}"), "text": text,
            "text_proj": take.dense(f"text_proj{suffix}")}


def convert_pretrain(sd: dict[str, np.ndarray], source: str = "checkpoint"):
    """-> (params, momentum params or None, queues or None, unmapped tensor names). The params lack the
    ITM head when the checkpoint is ALBEF's (overlay them on a fresh init: `mumc.overlay_params`)."""
    take = _Taker(sd, source)
    params = _pretrain_tree(take, "")
    params["temp"] = take("temp").reshape(())
    if take.has("itm_head.0.weight"):
        params["itm_fc1"], params["itm_ln"], params["itm_fc2"] = (
            take.dense("itm_head.0"), take.ln("itm_head.1"), take.dense("itm_head.3"))
    elif not take.has("itm_head.weight"):
        raise ValueError(f"{source}: no itm_head (MUMC's itm_head.0/1/3 or ALBEF's single-Linear itm_head)")
    # ALBEF.pth's itm_head is one Linear: MUMC's load_checkpoint finds no tensor of its two-layer head under
    # that name and keeps it freshly initialised, so `itm_head.*` is returned unmapped and the caller's
    # fresh head stays.
    momentum = _pretrain_tree(take, "_m") if take.has("visual_encoder_m.cls_token") else None
    queues = None
    if take.has("image_queue"):
        queues = {"image": take("image_queue").T.copy(), "text": take("text_queue").T.copy(),
                  "ptr": np.asarray(take.sd["queue_ptr"]).reshape(()).astype(np.int32)}
        take.used.add("queue_ptr")
    return params, momentum, queues, sorted(k for k in sd if k not in take.used)


def convert_vqa(sd: dict[str, np.ndarray], source: str = "checkpoint"):
    """A finetuned ALBEF/MUMC VQA checkpoint -> (VQAModel params, model fields, unmapped names).

    The ViT's position table becomes the learned `pos_embedding` at the checkpoint's own grid (set the
    model's `pretrain_image_size` to grid * patch, returned in the fields)."""
    take = _Taker(sd, source)
    v = "visual_encoder."
    depth_v = depth_of(sd, v + "blocks.", "ViT block")
    vision = vit_params_from_state_dict(take, v, depth_v)
    pos = take(v + "pos_embed")
    vision["pos_embedding"] = pos.reshape(pos.shape[-2], pos.shape[-1])
    patch = vision["patch_embed"]["kernel"].shape[0]
    grid = int(round((pos.shape[-2] - 1) ** 0.5))
    t = "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in sd) else "text_encoder."
    depth_t = depth_of(sd, t + "encoder.layer.", "text encoder layer")
    fusion = _fusion_layer(sd, t, depth_t)
    text = bert_params_from_state_dict(take, t, depth_t, fusion)
    depth_d = depth_of(sd, "text_decoder.bert.encoder.layer.", "answer decoder layer")
    decoder = bert_params_from_state_dict(take, "text_decoder.bert.", depth_d, 0, mlm_prefix="text_decoder.cls.")
    fields = dict(pretrain_image_size=grid * patch, patch_size=patch, vision_depth=depth_v, text_depth=depth_t,
                  fusion_layer=fusion, decoder_depth=depth_d)
    unmapped = sorted(k for k in sd if k not in take.used)
    return {"vision": vision, "text": text, "decoder": decoder}, fields, unmapped


def load_albef(path: str, target: str = "pretrain"):
    """Read the checkpoint safely and convert it for `target` ('pretrain' | 'vqa')."""
    sd = load_state_dict(path)
    converters = {"pretrain": convert_pretrain, "vqa": convert_vqa}
    if target not in converters:
        raise ValueError(f"target must be one of {sorted(converters)}, got {target!r}")
    return converters[target](sd, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="ALBEF/MUMC checkpoint (.pth or .safetensors)")
    parser.add_argument("--out", required=True, help="output .msgpack")
    parser.add_argument("--target", default="pretrain", choices=["pretrain", "vqa"])


def main(args) -> int:
    out = load_albef(args.src, args.target)
    if args.target == "pretrain":
        params, momentum, queues, unmapped = out
        tree = {"params": params, "momentum": momentum if momentum is not None else params}
        if queues is not None:
            tree["queues"] = queues
    else:
        params, fields, unmapped = out
        tree = {"params": params, "fields": fields}
    save_params(tree, args.out)
    print(f"wrote {args.out}; tensors not mapped: {unmapped or 'none'}")
    return 0

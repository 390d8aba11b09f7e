"""MAE ViT checkpoint (facebookresearch/mae's `mae_pretrain_vit_base.pth`, or a timm ViT state dict) -> the
MUMC image encoder's params (jaxboost.models.vit).

MUMC builds its image encoder from MAE's ViT-B/16 (models/model.py `build_visual_encoder('mask_vit')`): the
encoder keys `patch_embed.proj`, `cls_token`, `blocks.i.*`, `norm`. MAE's decoder (`decoder_*`, `mask_token`)
and its fixed sin-cos `pos_embed` are not image-encoder weights here (our ViT computes the sin-cos table at
the training grid); they are returned as unmapped names, as is a classifier `head.*` of a finetuned timm file.
"""
from __future__ import annotations

import argparse

from jaxboost.convert.albef import depth_of, vit_params_from_state_dict
from jaxboost.convert.bert import _Taker, load_state_dict, save_params


def convert_mae(sd, source: str = "checkpoint", prefix: str = ""):
    """-> (ViT params, unmapped tensor names). A file without ViT blocks raises naming it."""
    take = _Taker(sd, source)
    depth = depth_of(sd, prefix + "blocks.", f"{source}: ViT block")
    params = vit_params_from_state_dict(take, prefix, depth)
    return params, sorted(k for k in sd if k not in take.used)


def load_mae(path: str):
    """Read an MAE/timm ViT file safely (its "model" entry is unwrapped) and convert it."""
    return convert_mae(load_state_dict(path), path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="MAE/timm ViT checkpoint (.pth or .safetensors)")
    parser.add_argument("--out", required=True, help="output .msgpack of the image encoder's params")


def main(args) -> int:
    params, unmapped = load_mae(args.src)
    save_params(params, args.out)
    print(f"wrote {args.out}; tensors not mapped: {unmapped or 'none'}")
    return 0

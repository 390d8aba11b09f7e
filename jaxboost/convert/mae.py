"""MAE ViT checkpoint (facebookresearch/mae's `mae_pretrain_vit_base.pth`, or a timm ViT state dict) -> the
MUMC image encoder's params (jaxboost.models.vit).

  jaxboost convert mae --src mae_pretrain_vit_base.pth --out runs/mae   # then --config.init.mae=runs/mae

MUMC builds its image encoder from MAE's ViT-B/16 (models/model.py `build_visual_encoder('mask_vit')`): the
encoder keys `patch_embed.proj`, `cls_token`, `blocks.i.*`, `norm`, and the file's `pos_embed` resized to the
training grid (interpolate_pos_embed). The table is kept beside the params (`load_vision`): a
`vision_posemb="table"` model starts from it, the default sin-cos model computes the exact table at its grid.
MAE's decoder (`decoder_*`, `mask_token`) and a classifier `head.*` of a finetuned timm file are returned as
unmapped names. The converted folder holds model.json + variables.msgpack ({"params", "pos_embed"?}).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from jaxboost.convert.albef import depth_of, vit_params_from_state_dict
from jaxboost.convert.bert import _Taker, load_state_dict, read_component, write_component


def convert_mae(sd, source: str = "checkpoint", prefix: str = ""):
    """-> (ViT params, unmapped tensor names). A file without ViT blocks raises naming it."""
    take = _Taker(sd, source)
    depth = depth_of(sd, prefix + "blocks.", f"{source}: ViT block")
    params = vit_params_from_state_dict(take, prefix, depth)
    return params, sorted(k for k in sd if k not in take.used)


MODEL_NAME = "mae_vit"


def load_mae(path: str):
    """Read an MAE/timm ViT file safely (its "model" entry is unwrapped) and convert it."""
    return convert_mae(load_state_dict(path), path)


def file_position_table(sd, width: int):
    """The file's pos_embed as [1 + N, D] (MAE's sin-cos at its own grid), or None."""
    return np.asarray(sd["pos_embed"], np.float32).reshape(-1, width) if "pos_embed" in sd else None


def load_vision(path: str):
    """An MAE/timm file or a `jaxboost convert mae` folder -> (ViT params, position table [1 + N, D] or None)."""
    if os.path.isdir(path):
        converted = read_component(path, MODEL_NAME)
        if converted is None:
            raise ValueError(f"{path}: a folder but not a `jaxboost convert mae` folder (model.json + "
                             f"variables.msgpack); give the MAE .pth/.safetensors file or a converted folder")
        variables = converted[1]
        return variables["params"], variables.get("pos_embed")
    sd = load_state_dict(path)
    params, _ = convert_mae(sd, path)
    return params, file_position_table(sd, params["cls_token"].shape[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="MAE/timm ViT checkpoint (.pth or .safetensors)")
    parser.add_argument("--out", required=True,
                        help="output folder (model.json + variables.msgpack), for --config.init.mae")


def main(args) -> int:
    sd = load_state_dict(args.src)
    params, unmapped = convert_mae(sd, args.src)
    width = params["cls_token"].shape[-1]
    table = file_position_table(sd, width)
    variables = {"params": params, **({"pos_embed": table} if table is not None else {})}
    fields = {"width": width, "depth": sum(k.startswith("block") for k in params),
              "patch_size": int(params["patch_embed"]["kernel"].shape[0])}
    unmapped = [k for k in unmapped if k != "pos_embed"]
    write_component(args.out, MODEL_NAME, fields, variables, args.src, unmapped)
    print(f"wrote {os.path.abspath(args.out)} (a converted MAE ViT: --config.init.mae={args.out}); "
          f"tensors not mapped: {unmapped or 'none'}")
    return 0

"""MUMC parameter surgery: a converted HF BERT over a fresh init, and pretraining params -> the VQA model's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxboost.models import vit


def sincos_table(grid: int, width: int) -> np.ndarray:
    """MAE's fixed table with its class-token row: [1 + grid^2, width]."""
    return np.concatenate([np.zeros((1, width), np.float32), vit.sincos_2d_posemb(grid, width)])


def fit_position_table(table, grid: int, where: str) -> np.ndarray:
    """A checkpoint's position table [1 + g*g, D] at the model's grid (MUMC's interpolate_pos_embed: the class
    row kept, the patch grid resized bicubic); `where` names the source in the error of a malformed table."""
    try:
        return vit.interpolate_pos_embed(table, grid)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


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


def answer_decoder_from_text_encoder(text_params, first_layer: int = 6, depth: int = 6):
    """ALBEF/MUMC VQA init: decoder embeddings and MLM head from the text encoder, decoder layer i from
    encoder layer first_layer + i (these carry the cross-attention weights the decoder needs)."""
    out = {k: text_params[k] for k in ("embeddings", "mlm_transform", "mlm_ln", "mlm_bias")}
    for i in range(depth):
        out[f"layer{i}"] = text_params[f"layer{first_layer + i}"]
    return jax.tree_util.tree_map(jnp.array, out)


def vqa_params_from_pretrain(pretrain_params, pretrain_grid: int, first_layer: int = 6, decoder_depth: int = 6,
                             table_grid: int | None = None):
    """Pretraining params -> VQAModel params: ViT with its sin-cos table made explicit, text encoder without
    the MLM head, answer decoder from layers first_layer.. of the text encoder. `table_grid`: the VQA model's
    stored grid (its pretrain_image_size / patch) when it differs from the pretraining run's (the table is
    resized as MUMC's interpolate_pos_embed)."""
    vision = dict(pretrain_params["vision"])
    if "pos_embedding" not in vision:   # a "table" pretraining model (ALBEF.pth start) already holds one
        vision["pos_embedding"] = jnp.asarray(sincos_table(pretrain_grid, vision["cls_token"].shape[-1]))
    if table_grid is not None:
        vision["pos_embedding"] = jnp.asarray(fit_position_table(vision["pos_embedding"], table_grid,
                                                                 "pretraining vision/pos_embedding"))
    text = {k: v for k, v in pretrain_params["text"].items() if not k.startswith("mlm")}
    return {"vision": vision, "text": text,
            "decoder": answer_decoder_from_text_encoder(pretrain_params["text"], first_layer, decoder_depth)}

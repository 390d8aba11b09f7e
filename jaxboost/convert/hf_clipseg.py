"""HF `CLIPSegForImageSegmentation` folder (save_pretrained: config.json + model.safetensors or
pytorch_model.bin) -> jaxboost.models.clipseg.Model variables.

    jaxboost convert clipseg --hf HF_DIR --out DIR [--tokenizer CLIP_TOKENIZER_DIR] [--config configs/clipseg.py:full]

With a tokenizer (the HF folder's own, as the hub's CLIPSeg folders hold, or --tokenizer), DIR is a finished
CLIPSeg run at step 0 (config.json, ckpt/0, tokenizer/: see jaxboost.convert.run_folder) that
`jaxboost eval --workdir DIR --config.data.corpus=C` scores zero-shot and `train --config.init_from=DIR`
finetunes; either way DIR/model.json + DIR/variables.msgpack serve `--config.pretrained=DIR`.

Every tensor is mapped or deliberately dropped with the reason below; anything else is an error naming it.
Dropped: vision layers after the deepest `extract_layers` entry, `post_layernorm`, `visual_projection` and
`logit_scale` (they only produce HF's `pooled_output`/contrastive logits, never the segmentation logits).
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxboost.convert.clip import (Taker, check_variables, fail_on_unmapped, hf_block, hf_text_params,
                                   hf_vision_params, load_state_dict)
from jaxboost.convert.run_folder import add_vl_seg_arguments, write_vl_seg_run
from jaxboost.models import clipseg
from jaxboost.train import tokenizer_setup


def model_fields(cfg: dict) -> dict:
    """config.json of a CLIPSeg checkpoint -> clipseg.Model fields."""
    if cfg.get("model_type") != "clipseg":
        raise ValueError(f"config.json: model_type {cfg.get('model_type')!r} is not 'clipseg'")
    v, t = cfg.get("vision_config", {}), cfg.get("text_config", {})
    for name, sub in (("vision_config", v), ("text_config", t)):
        if sub.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"config.json: {name}.hidden_act {sub['hidden_act']!r} unsupported (quick_gelu)")
    return dict(
        vision_width=v.get("hidden_size", 768), vision_depth=v.get("num_hidden_layers", 12),
        vision_heads=v.get("num_attention_heads", 12), vision_mlp_dim=v.get("intermediate_size", 3072),
        patch_size=v.get("patch_size", 32), vision_image_size=v.get("image_size", 224),
        vocab_size=t.get("vocab_size", 49408), text_width=t.get("hidden_size", 512),
        text_depth=t.get("num_hidden_layers", 12), text_heads=t.get("num_attention_heads", 8),
        text_mlp_dim=t.get("intermediate_size", 2048), context_length=t.get("max_position_embeddings", 77),
        eos_token_id=t.get("eos_token_id", 49407), projection_dim=cfg.get("projection_dim", 512),
        extract_layers=tuple(cfg.get("extract_layers", (3, 6, 9))), reduce_dim=cfg.get("reduce_dim", 64),
        decoder_heads=cfg.get("decoder_num_attention_heads", 4),
        decoder_mlp_dim=cfg.get("decoder_intermediate_size", 2048),
        conditional_layer=cfg.get("conditional_layer", 0),
        complex_transposed_conv=bool(cfg.get("use_complex_transposed_convolution", False)))


def variables_from_state_dict(sd: dict, fields: dict, source: str) -> dict:
    take = Taker(sd, source)
    if not take.has("decoder.film_mul.weight"):
        raise ValueError(f"{source}: no decoder.film_mul.weight: not a CLIPSegForImageSegmentation checkpoint")
    used_depth = max(fields["extract_layers"]) + 1
    tv, vv = "clip.text_model.", "clip.vision_model."
    text = hf_text_params(take, tv, fields["text_depth"], "clip.text_projection")
    vision = hf_vision_params(take, vv, used_depth, post_norm=False)
    # Unused by the segmentation logits (see the module docstring).
    take.skip(*[k for k in sd if any(k.startswith(f"{vv}encoder.layers.{i}.")
                                     for i in range(used_depth, fields["vision_depth"]))])
    take.skip(vv + "post_layernorm.weight", vv + "post_layernorm.bias", "clip.visual_projection.weight",
              "clip.logit_scale")
    params = {"text": text, "vision": vision, "film_mul": take.dense("decoder.film_mul"),
              "film_add": take.dense("decoder.film_add")}
    for i in range(len(fields["extract_layers"])):
        params[f"reduce{i}"] = take.dense(f"decoder.reduces.{i}")
        params[f"decoder_block{i}"] = hf_block(take, f"decoder.layers.{i}.")
    tc = "decoder.transposed_convolution"
    if fields["complex_transposed_conv"]:
        params["head_conv"] = {"kernel": take.conv(tc + ".0.weight"), "bias": take(tc + ".0.bias")}
        params["head_up1"] = {"kernel": take.conv_transpose(tc + ".2.weight"), "bias": take(tc + ".2.bias")}
        params["head_up2"] = {"kernel": take.conv_transpose(tc + ".4.weight"), "bias": take(tc + ".4.bias")}
    else:
        params["head_up"] = {"kernel": take.conv_transpose(tc + ".weight"), "bias": take(tc + ".bias")}
    fail_on_unmapped(take)
    return {"params": params}


def _weights_file(folder: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def clipseg_from_hf(path: str, **overrides):
    """Local HF CLIPSeg folder -> (clipseg.Model, variables). `overrides` set model fields
    (e.g. freeze_encoders=False, attention_impl="xla")."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in CLIPSeg folder {path}")
    with open(cfg_path) as f:
        fields = model_fields(json.load(f))
    weights = _weights_file(path)
    variables = variables_from_state_dict(load_state_dict(weights), fields, weights)
    module = clipseg.Model(**fields, **overrides)
    n = fields["vision_image_size"]
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, n, n, 3)),
                            jnp.ones((1, 2), jnp.int32))
    return module, check_variables(variables, shapes, weights)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="local HF CLIPSeg folder (save_pretrained output)")
    parser.add_argument("--out", required=True, help="output folder (a run folder given a tokenizer)")
    add_vl_seg_arguments(parser, "configs/clipseg.py:full")


def main(args) -> int:
    module, variables = clipseg_from_hf(args.hf)
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables))
    tokenizer = args.tokenizer or (args.hf if tokenizer_setup.is_ready(args.hf) else "")
    if write_vl_seg_run(args.out, args, "clipseg", module, variables, tokenizer):
        print(f"wrote {args.out}: {n:,} parameters, a CLIPSeg run at step 0 (tokenizer from {tokenizer})")
    else:
        print(f"wrote {args.out}: {n:,} parameters (for --config.pretrained; {args.hf} holds no tokenizer: pass "
              "--tokenizer CLIP_TOKENIZER_DIR for a run folder that eval and init_from open)")
    return 0

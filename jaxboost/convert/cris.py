"""CRIS checkpoints (CRIS.pytorch state dicts) and OpenAI CLIP RN50 -> jaxboost.models.cris.Model variables.

    jaxboost convert cris --checkpoint CRIS.pth [--clip RN50.pt] --out DIR
    jaxboost convert cris --clip RN50.pt --out DIR        # CLIP backbone, freshly initialised CRIS head
    ... --tokenizer CLIP_TOKENIZER_DIR [--config configs/cris.py:full]   # DIR: a CRIS run at step 0

With --tokenizer (a local CLIP tokenizer folder; CRIS files hold none) DIR is a finished CRIS run at step 0
(config.json, ckpt/0, tokenizer/: see jaxboost.convert.run_folder) that `jaxboost eval --workdir DIR
--config.data.corpus=C` scores zero-shot and `train --config.init_from=DIR` finetunes; either way
DIR/model.json + DIR/variables.msgpack serve `--config.pretrained=DIR`.

A trained CRIS checkpoint holds everything (`backbone.*`, `neck.*`, `decoder.*`, `proj.*`; "module." and a
"state_dict" wrapper are unwrapped). With only a CLIP file, the backbone comes from it and the rest (neck,
decoder, projector, and CRIS's `attnpool.connect` residual, absent from CLIP) is initialised from `seed`.
Every tensor is mapped or named in an error. Dropped on purpose: CLIP's `logit_scale` and the
`input_resolution`/`context_length`/`vocab_size` entries of OpenAI files (not weights).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxboost.convert.clip import (Taker, check_variables, fail_on_unmapped, fill_missing, load_state_dict,
                                   openai_resnet_variables, openai_text_variables)
from jaxboost.convert.run_folder import add_vl_seg_arguments, write_vl_seg_run
from jaxboost.models import cris

_NOT_WEIGHTS = ("logit_scale", "input_resolution", "context_length", "vocab_size")


def _bn(take: Taker, prefix: str) -> tuple[dict, dict]:
    take.skip(prefix + ".num_batches_tracked")
    return ({"scale": take(prefix + ".weight"), "bias": take(prefix + ".bias")},
            {"mean": take(prefix + ".running_mean"), "var": take(prefix + ".running_var")})


def _backbone(take: Taker, prefix: str, pool_has_connect: bool) -> tuple[dict, dict, dict]:
    visual, visual_stats, vfields = openai_resnet_variables(take, prefix + "visual.",
                                                            pool="cris" if pool_has_connect else "clip")
    text, tfields = openai_text_variables(take, prefix)
    take.skip(*(prefix + n for n in _NOT_WEIGHTS))
    fields = dict(stage_sizes=vfields["stage_sizes"], vision_width=vfields["width"],
                  embed_dim=vfields["output_dim"], vision_image_size=vfields["image_size"],
                  vocab_size=tfields["vocab_size"], text_width=tfields["width"], text_depth=tfields["depth"],
                  text_heads=tfields["num_heads"], context_length=tfields["context_length"])
    if tfields["projection_dim"] != vfields["output_dim"]:
        raise ValueError(f"{take.source}: text projection {tfields['projection_dim']} != image embedding "
                         f"{vfields['output_dim']}")
    return {"visual": visual, "text": text}, {"visual": visual_stats}, fields


def _head(take: Taker) -> tuple[dict, dict, dict]:
    params, stats = {}, {}
    neck_p, neck_s = {}, {}
    neck_p["txt_proj"] = {"kernel": take("neck.txt_proj.0.weight").T}
    neck_p["txt_proj_bn"], neck_s["txt_proj_bn"] = _bn(take, "neck.txt_proj.1")
    neck_p["f1_norm"], neck_s["f1_norm"] = _bn(take, "neck.norm_layer.0")
    for name in ("f1_v_proj", "f2_v_proj", "f2_cat", "f3_v_proj", "f3_cat", "f4_proj5", "f4_proj4", "f4_proj3",
                 "aggr"):
        take.conv_bn(f"neck.{name}.0", f"neck.{name}.1", neck_p, neck_s, name)
    take.conv_bn("neck.coordconv.0.conv1.0", "neck.coordconv.0.conv1.1", neck_p, neck_s, "coordconv")
    take.conv_bn("neck.coordconv.1.0", "neck.coordconv.1.1", neck_p, neck_s, "coordconv_out")
    params["neck"], stats["neck"] = neck_p, neck_s
    num_layers = len({k.split(".")[2] for k in take.sd if k.startswith("decoder.layers.")})
    for i in range(num_layers):
        s = f"decoder.layers.{i}."
        params[f"decoder_layer{i}"] = {
            "self_attn": take.packed_attention(s + "self_attn"),
            "cross_attn": take.packed_attention(s + "multihead_attn"),
            **{n: take.ln(s + n) for n in ("norm1", "norm2", "norm3", "self_attn_norm", "cross_attn_norm")},
            "ffn_fc1": take.dense(s + "ffn.0"), "ffn_norm": take.ln(s + "ffn.3"), "ffn_fc2": take.dense(s + "ffn.4")}
    params["decoder_norm"] = take.ln("decoder.norm")
    proj_p, proj_s = {}, {}
    take.conv_bn("proj.vis.1.0", "proj.vis.1.1", proj_p, proj_s, "vis_conv1")
    take.conv_bn("proj.vis.3.0", "proj.vis.3.1", proj_p, proj_s, "vis_conv2")
    proj_p["vis_out"] = {"kernel": take.conv("proj.vis.4.weight"), "bias": take("proj.vis.4.bias")}
    proj_p["txt"] = take.dense("proj.txt")
    params["proj"], stats["proj"] = proj_p, proj_s
    fields = dict(fpn_out=(neck_p["f3_v_proj"]["conv"]["kernel"].shape[-1],
                           neck_p["f2_v_proj"]["conv"]["kernel"].shape[-1],
                           neck_p["f1_v_proj"]["conv"]["kernel"].shape[-1]),
                  num_layers=num_layers, mlp_dim=params["decoder_layer0"]["ffn_fc1"]["kernel"].shape[1])
    return params, stats, fields


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def variables_from_state_dicts(checkpoint_sd: dict | None, clip_sd: dict | None,
                               sources: tuple[str, str] = ("checkpoint", "clip")):
    """State dicts -> (variables as far as the files go, model fields, whether parts need an init)."""
    variables, fields, needs_fill = {"params": {}, "batch_stats": {}}, {}, checkpoint_sd is None
    if checkpoint_sd is not None:
        take = Taker(checkpoint_sd, sources[0])
        if not take.has("neck.f1_v_proj.0.weight"):
            raise ValueError(f"{sources[0]}: no neck.f1_v_proj.0.weight: not a CRIS checkpoint")
        params, stats, fields = _head(take)
        variables = {"params": params, "batch_stats": stats}
        if take.has("backbone.visual.layer1.0.conv1.weight"):
            bp, bs, bf = _backbone(take, "backbone.", pool_has_connect=True)
            variables = _merge(variables, {"params": bp, "batch_stats": bs})
            fields.update(bf)
            clip_sd = None
        elif clip_sd is None:
            raise ValueError(f"{sources[0]}: holds no backbone.* weights; pass the CLIP file too (--clip)")
        fail_on_unmapped(take)
    if clip_sd is not None:
        take = Taker(clip_sd, sources[1])
        bp, bs, bf = _backbone(take, "", pool_has_connect=take.has("visual.attnpool.connect.0.weight"))
        fail_on_unmapped(take)
        needs_fill = needs_fill or "connect" not in bp["visual"]["attnpool"]
        variables = _merge(variables, {"params": bp, "batch_stats": bs})
        fields.update(bf)
    return variables, fields, needs_fill


def cris_from_checkpoint(checkpoint: str | None = None, clip: str | None = None, seed: int = 0, **overrides):
    """-> (cris.Model, variables). `overrides` set model fields (num_heads, dropout_rate, pad_mode, ...)."""
    if checkpoint is None and clip is None:
        raise ValueError("give a CRIS checkpoint, an OpenAI CLIP RN50 file, or both")
    variables, fields, needs_fill = variables_from_state_dicts(
        None if checkpoint is None else load_state_dict(checkpoint), None if clip is None else load_state_dict(clip),
        (str(checkpoint), str(clip)))
    module = cris.Model(**{**fields, **overrides})
    n = fields["vision_image_size"]
    example = (jnp.zeros((1, n, n, 3)), jnp.ones((1, 4), jnp.int32))
    shapes = jax.eval_shape(module.init, jax.random.key(0), *example)
    if needs_fill:
        # What the files lack (the CRIS head, CRIS's attention-pool residual) is freshly initialised.
        variables = fill_missing(variables, shapes, seed)
    return module, check_variables(variables, shapes, " + ".join(s for s in (checkpoint, clip) if s))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="CRIS.pytorch checkpoint (.pth/.pt/.safetensors)")
    parser.add_argument("--clip", help="OpenAI CLIP RN50 file (TorchScript .pt or a state dict)")
    parser.add_argument("--out", required=True, help="output folder (a run folder given --tokenizer)")
    parser.add_argument("--num-heads", type=int, default=8, help="decoder heads (not stored in checkpoints)")
    parser.add_argument("--text-heads", type=int, default=None,
                        help="text encoder heads (default: width // 64, OpenAI CLIP's rule)")
    parser.add_argument("--seed", type=int, default=0, help="init seed for parts the files lack")
    add_vl_seg_arguments(parser, "configs/cris.py:full")


def main(args) -> int:
    extra = {} if args.text_heads is None else {"text_heads": args.text_heads}
    module, variables = cris_from_checkpoint(args.checkpoint, args.clip, args.seed, num_heads=args.num_heads, **extra)
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))
    if write_vl_seg_run(args.out, args, "cris", module, variables, args.tokenizer):
        print(f"wrote {args.out}: {n:,} parameters, a CRIS run at step 0 (tokenizer from {args.tokenizer})")
    else:
        print(f"wrote {args.out}: {n:,} parameters (for --config.pretrained; pass --tokenizer CLIP_TOKENIZER_DIR "
              "for a run folder that eval and init_from open)")
    return 0

"""A jaxboost CLIPSeg (a trained run or a `jaxboost convert clipseg` folder) -> a Hugging Face folder that
`CLIPSegForImageSegmentation.from_pretrained(DIR)` loads.

  jaxboost export clipseg --workdir W --out DIR      # DIR/config.json + DIR/model.safetensors

The inverse of `jaxboost convert clipseg`: HF names and torch layouts (Linear [out, in], conv [O, I, kh, kw],
ConvTranspose [I, O, kh, kw] unflipped). What jaxboost never kept because the segmentation logits do not use it
(vision layers after the deepest extract layer, post_layernorm, visual_projection, logit_scale) is left out of
the file: from_pretrained initialises those and warns, and the logits are the same.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxboost.export import open_vl_seg
from jaxboost.export.cris import StateDictWriter


def hf_config(fields: dict) -> dict:
    """clipseg.Model fields -> CLIPSegConfig kwargs (the inverse of convert's model_fields)."""
    if tuple(fields.get("head_kernels", ()) or ()):
        raise ValueError(f"model.head_kernels={tuple(fields['head_kernels'])}: HF CLIPSeg's head has no such option "
                         "(its transposed convolutions are patch_size // 4); export needs head_kernels=()")
    eos = 2 if fields["eos_token_id"] is None else fields["eos_token_id"]  # 2: HF's legacy argmax pooling
    return dict(
        model_type="clipseg", architectures=["CLIPSegForImageSegmentation"],
        text_config=dict(vocab_size=fields["vocab_size"], hidden_size=fields["text_width"],
                         num_hidden_layers=fields["text_depth"], num_attention_heads=fields["text_heads"],
                         intermediate_size=fields["text_mlp_dim"], max_position_embeddings=fields["context_length"],
                         eos_token_id=eos, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=fields["vision_width"], num_hidden_layers=fields["vision_depth"],
                           num_attention_heads=fields["vision_heads"], intermediate_size=fields["vision_mlp_dim"],
                           patch_size=fields["patch_size"], image_size=fields["vision_image_size"],
                           hidden_act="quick_gelu"),
        projection_dim=fields["projection_dim"], extract_layers=list(fields["extract_layers"]),
        reduce_dim=fields["reduce_dim"], decoder_num_attention_heads=fields["decoder_heads"],
        decoder_intermediate_size=fields["decoder_mlp_dim"], conditional_layer=fields["conditional_layer"],
        use_complex_transposed_convolution=bool(fields["complex_transposed_conv"]))


def _block(give: StateDictWriter, src: str, p: dict) -> None:
    give.ln(src + "layer_norm1", p["ln1"])
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
        give.dense(f"{src}self_attn.{theirs}", p["attn"][ours])
    give.ln(src + "layer_norm2", p["ln2"])
    give.dense(src + "mlp.fc1", p["mlp"]["fc1"])
    give.dense(src + "mlp.fc2", p["mlp"]["fc2"])


def _conv_transpose(give: StateDictWriter, name: str, p: dict) -> None:
    # convert: torch [I, O, kh, kw] spatially flipped -> flax [kh, kw, I, O]; here backwards
    give.put(name + ".weight", np.asarray(p["kernel"]).transpose(2, 3, 0, 1)[:, :, ::-1, ::-1])
    give.put(name + ".bias", p["bias"])


def hf_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Our CLIPSeg params -> CLIPSegForImageSegmentation tensors (numpy)."""
    p = jax.device_get(params)
    give, tv, vv = StateDictWriter(), "clip.text_model.", "clip.vision_model."
    text, vision = p["text"], p["vision"]
    give.put(tv + "embeddings.token_embedding.weight", text["token_embedding"]["embedding"])
    give.put(tv + "embeddings.position_embedding.weight", text["pos_embedding"])
    give.ln(tv + "final_layer_norm", text["ln_final"])
    give.put("clip.text_projection.weight", np.asarray(text["text_projection"]["kernel"]).T)
    for name in (k for k in text if k.startswith("block")):
        _block(give, f"{tv}encoder.layers.{name[len('block'):]}.", text[name])
    give.conv(vv + "embeddings.patch_embedding.weight", vision["patch_embed"]["kernel"])
    give.put(vv + "embeddings.class_embedding", vision["cls_token"])
    give.put(vv + "embeddings.position_embedding.weight", vision["pos_embedding"])
    give.ln(vv + "pre_layrnorm", vision["ln_pre"])
    for name in (k for k in vision if k.startswith("block")):
        _block(give, f"{vv}encoder.layers.{name[len('block'):]}.", vision[name])
    give.dense("decoder.film_mul", p["film_mul"])
    give.dense("decoder.film_add", p["film_add"])
    for name in (k for k in p if k.startswith("reduce")):
        give.dense(f"decoder.reduces.{name[len('reduce'):]}", p[name])
    for name in (k for k in p if k.startswith("decoder_block")):
        _block(give, f"decoder.layers.{name[len('decoder_block'):]}.", p[name])
    tc = "decoder.transposed_convolution"
    if "head_conv" in p:
        give.conv(tc + ".0.weight", p["head_conv"]["kernel"])
        give.put(tc + ".0.bias", p["head_conv"]["bias"])
        _conv_transpose(give, tc + ".2", p["head_up1"])
        _conv_transpose(give, tc + ".4", p["head_up2"])
    else:
        _conv_transpose(give, tc, p["head_up"])
    return give.sd


def load_model(workdir: str) -> tuple[dict, dict]:
    """A converted folder (model.json) or a trained CLIPSeg run (best checkpoint) -> (model fields, params)."""
    module, variables = open_vl_seg(workdir, "clipseg")
    fields = {k: getattr(module, k) for k in type(module).__dataclass_fields__ if k not in ("parent", "name")}
    return fields, variables["params"]


def export_folder(workdir: str, out: str) -> None:
    """Write OUT/config.json + OUT/model.safetensors, through a temporary folder renamed at the end."""
    from safetensors.numpy import save_file
    fields, params = load_model(workdir)
    out = os.path.abspath(out)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        raise ValueError(f"{out}/model.safetensors already exists; choose an empty --out folder")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".clipseg_export_", dir=os.path.dirname(out))
    try:
        save_file(hf_state_dict(params), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(fields), f, indent=2)
        os.makedirs(out, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="a trained CLIPSeg run or a `jaxboost convert clipseg` folder")
    parser.add_argument("--out", required=True, help="output HF folder (config.json + model.safetensors)")


def main(args) -> int:
    export_folder(args.workdir, args.out)
    print(f"wrote {args.out}: CLIPSegForImageSegmentation.from_pretrained({args.out!r}) loads it")
    return 0

"""A jaxboost CRIS (a trained run or a `jaxboost convert cris` folder) -> a CRIS.pytorch `CRIS` state dict.

  jaxboost export cris --workdir W --out cris.safetensors

The inverse of `jaxboost convert cris`: CRIS.pytorch's names (`backbone.visual.*`, `backbone.transformer.*`,
`neck.*`, `decoder.*`, `proj.*`) and torch layouts, so `CRIS.load_state_dict(..., strict=True)` takes it.
What jaxboost does not keep is written as torch initialises it: every BatchNorm's `num_batches_tracked` 0 and
CLIP's unused `logit_scale` log(1 / 0.07). Safetensors by default; a .pt name writes torch.save.
"""
from __future__ import annotations

import argparse
import math

import jax
import numpy as np

from jaxboost.export import open_vl_seg
from jaxboost.export.sdm import write_state_dict

_NECK_CONV_BN = ("f1_v_proj", "f2_v_proj", "f2_cat", "f3_v_proj", "f3_cat", "f4_proj5", "f4_proj4", "f4_proj3",
                 "aggr")


class StateDictWriter:
    """Writes torch tensors by name from our variables (the converter's Taker, backwards)."""

    def __init__(self):
        self.sd: dict[str, np.ndarray] = {}

    def put(self, name: str, value) -> None:
        self.sd[name] = np.ascontiguousarray(np.asarray(value, np.float32))

    def dense(self, prefix: str, p: dict) -> None:
        self.put(prefix + ".weight", np.asarray(p["kernel"]).T)
        if "bias" in p:
            self.put(prefix + ".bias", p["bias"])

    def ln(self, prefix: str, p: dict) -> None:
        self.put(prefix + ".weight", p["scale"])
        self.put(prefix + ".bias", p["bias"])

    def conv(self, name: str, kernel) -> None:
        self.put(name, np.asarray(kernel).transpose(3, 2, 0, 1))  # flax [kh, kw, I, O] -> torch [O, I, kh, kw]

    def bn(self, prefix: str, p: dict, s: dict) -> None:
        self.ln(prefix, p)
        self.put(prefix + ".running_mean", s["mean"])
        self.put(prefix + ".running_var", s["var"])
        self.sd[prefix + ".num_batches_tracked"] = np.zeros((), np.int64)

    def conv_bn(self, conv: str, bn: str, p: dict, s: dict) -> None:
        self.conv(conv + ".weight", p["conv"]["kernel"])
        self.bn(bn, p["bn"], s["bn"])

    def packed_attention(self, prefix: str, p: dict) -> None:
        names = ("query", "key", "value")
        self.put(prefix + ".in_proj_weight", np.concatenate([np.asarray(p[n]["kernel"]).T for n in names]))
        self.put(prefix + ".in_proj_bias", np.concatenate([p[n]["bias"] for n in names]))
        self.dense(prefix + ".out_proj", p["out"])


def _visual(give: StateDictWriter, p: dict, s: dict, prefix: str = "backbone.visual.") -> None:
    for i in (1, 2, 3):
        give.conv_bn(f"{prefix}conv{i}", f"{prefix}bn{i}", p[f"stem{i}"], s[f"stem{i}"])
    for block in sorted(k for k in p if k.startswith("layer")):
        stage, i = block[len("layer"):].split("_")
        src = f"{prefix}layer{stage}.{i}."
        for j in (1, 2, 3):
            give.conv_bn(f"{src}conv{j}", f"{src}bn{j}", p[block][f"c{j}"], s[block][f"c{j}"])
        if "downsample" in p[block]:
            give.conv_bn(src + "downsample.0", src + "downsample.1", p[block]["downsample"], s[block]["downsample"])
    pool, a = p["attnpool"], prefix + "attnpool."
    give.put(a + "positional_embedding", pool["pos_embedding"])
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "c_proj")):
        give.dense(a + theirs, pool[ours])
    give.conv_bn(a + "connect.0", a + "connect.1", pool["connect"], s["attnpool"]["connect"])


def _text(give: StateDictWriter, p: dict, prefix: str = "backbone.") -> None:
    give.put(prefix + "token_embedding.weight", p["token_embedding"]["embedding"])
    give.put(prefix + "positional_embedding", p["pos_embedding"])
    give.ln(prefix + "ln_final", p["ln_final"])
    give.put(prefix + "text_projection", p["text_projection"]["kernel"])  # used as x @ proj: no transpose
    for block in sorted(k for k in p if k.startswith("block")):
        src, b = f"{prefix}transformer.resblocks.{block[len('block'):]}.", p[block]
        give.ln(src + "ln_1", b["ln1"])
        give.packed_attention(src + "attn", b["attn"])
        give.ln(src + "ln_2", b["ln2"])
        give.dense(src + "mlp.c_fc", b["mlp"]["fc1"])
        give.dense(src + "mlp.c_proj", b["mlp"]["fc2"])
    give.put(prefix + "logit_scale", np.float32(math.log(1 / 0.07)))  # CLIP's init; CRIS never uses it


def _head(give: StateDictWriter, p: dict, s: dict) -> None:
    neck, neck_s = p["neck"], s["neck"]
    give.put("neck.txt_proj.0.weight", np.asarray(neck["txt_proj"]["kernel"]).T)
    give.bn("neck.txt_proj.1", neck["txt_proj_bn"], neck_s["txt_proj_bn"])
    give.bn("neck.norm_layer.0", neck["f1_norm"], neck_s["f1_norm"])
    for name in _NECK_CONV_BN:
        give.conv_bn(f"neck.{name}.0", f"neck.{name}.1", neck[name], neck_s[name])
    give.conv_bn("neck.coordconv.0.conv1.0", "neck.coordconv.0.conv1.1", neck["coordconv"], neck_s["coordconv"])
    give.conv_bn("neck.coordconv.1.0", "neck.coordconv.1.1", neck["coordconv_out"], neck_s["coordconv_out"])
    for layer in sorted(k for k in p if k.startswith("decoder_layer")):
        d, src = p[layer], f"decoder.layers.{layer[len('decoder_layer'):]}."
        give.packed_attention(src + "self_attn", d["self_attn"])
        give.packed_attention(src + "multihead_attn", d["cross_attn"])
        for n in ("norm1", "norm2", "norm3", "self_attn_norm", "cross_attn_norm"):
            give.ln(src + n, d[n])
        give.dense(src + "ffn.0", d["ffn_fc1"])
        give.ln(src + "ffn.3", d["ffn_norm"])
        give.dense(src + "ffn.4", d["ffn_fc2"])
    give.ln("decoder.norm", p["decoder_norm"])
    proj, proj_s = p["proj"], s["proj"]
    give.conv_bn("proj.vis.1.0", "proj.vis.1.1", proj["vis_conv1"], proj_s["vis_conv1"])
    give.conv_bn("proj.vis.3.0", "proj.vis.3.1", proj["vis_conv2"], proj_s["vis_conv2"])
    give.conv("proj.vis.4.weight", proj["vis_out"]["kernel"])
    give.put("proj.vis.4.bias", proj["vis_out"]["bias"])
    give.dense("proj.txt", proj["txt"])


def cris_state_dict(variables: dict) -> dict[str, np.ndarray]:
    """Our CRIS variables ({"params", "batch_stats"}) -> CRIS.pytorch state dict (numpy)."""
    variables = jax.device_get(variables)
    p, s = variables["params"], variables["batch_stats"]
    give = StateDictWriter()
    _visual(give, p["visual"], s["visual"])
    _text(give, p["text"])
    _head(give, p, s)
    return give.sd


def load_variables(workdir: str) -> dict:
    """A `jaxboost convert cris` folder (model.json) or a trained CRIS run (its best checkpoint) -> variables."""
    return open_vl_seg(workdir, "cris")[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="a trained CRIS run or a `jaxboost convert cris` folder")
    parser.add_argument("--out", required=True, help="state dict file (.safetensors; .pt for torch.save)")


def main(args) -> int:
    state_dict = cris_state_dict(load_variables(args.workdir))
    write_state_dict(state_dict, args.out)
    print(f"wrote {args.out}: {len(state_dict)} tensors")
    return 0

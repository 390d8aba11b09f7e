"""HF BERT (local folder: config.json + model.safetensors or pytorch_model.bin) -> jaxboost.models.bert params.

Every tensor is mapped by rule or reported: a missing tensor is an error naming it; tensors we do not use
(the pooler, position_ids buffers) are listed in the return value so callers can say what was skipped.
`bert_params_from_state_dict` is shared with the ALBEF/MUMC converter (prefix "text_encoder.bert.").
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from jaxboost.convert.torch_files import load_state_dict  # noqa: F401  (re-exported)

# (ours, HF) for one layer; Dense kernels are transposed (torch stores [out, in]).
_ATTN = [("query", "self.query"), ("key", "self.key"), ("value", "self.value"), ("out", "output.dense")]
# bert-base-uncased's file is a BertForPreTraining: its next-sentence head (cls.seq_relationship) is unused.
_IGNORED_SUFFIXES = ("position_ids", "pooler.dense.weight", "pooler.dense.bias", "token_type_ids",
                     "seq_relationship.weight", "seq_relationship.bias")


class _Taker:
    """Pops tensors from a state dict, raising a clear error for a missing one."""

    def __init__(self, sd: dict[str, np.ndarray], source: str):
        self.sd, self.source, self.used = sd, source, set()

    def __call__(self, name: str, transpose: bool = False) -> np.ndarray:
        if name not in self.sd:
            raise ValueError(f"{self.source}: tensor {name!r} missing from the checkpoint")
        self.used.add(name)
        t = np.asarray(self.sd[name], np.float32)
        return t.T if transpose else t

    def has(self, name: str) -> bool:
        return name in self.sd

    def dense(self, prefix: str) -> dict:
        return {"kernel": self(prefix + ".weight", True), "bias": self(prefix + ".bias")}

    def ln(self, prefix: str) -> dict:
        # HF BERT LayerNorm uses weight/bias (old checkpoints: gamma/beta).
        if self.has(prefix + ".gamma"):
            return {"scale": self(prefix + ".gamma"), "bias": self(prefix + ".beta")}
        return {"scale": self(prefix + ".weight"), "bias": self(prefix + ".bias")}


def bert_params_from_state_dict(take: _Taker, prefix: str, depth: int, fusion_layer: int,
                                mlm_prefix: str | None = None, layer_offset: int = 0) -> dict:
    """Map `prefix`embeddings/encoder.layer.{i} (+ `mlm_prefix`predictions.*) to our param tree.

    `layer_offset` reads HF layer i + offset into our layer i (the answer decoder from layers 6-11).
    """
    e = prefix + "embeddings."
    params = {"embeddings": {
        "word_embeddings": {"embedding": take(e + "word_embeddings.weight")},
        "position_embeddings": {"embedding": take(e + "position_embeddings.weight")},
        "token_type_embeddings": {"embedding": take(e + "token_type_embeddings.weight")},
        "ln": take.ln(e + "LayerNorm")}}
    for i in range(depth):
        src = f"{prefix}encoder.layer.{i + layer_offset}."
        layer = {"attention": {o: take.dense(src + "attention." + h) for o, h in _ATTN},
                 "attention_ln": take.ln(src + "attention.output.LayerNorm"),
                 "intermediate": take.dense(src + "intermediate.dense"),
                 "output": take.dense(src + "output.dense"),
                 "output_ln": take.ln(src + "output.LayerNorm")}
        if i >= fusion_layer:
            layer["crossattention"] = {o: take.dense(src + "crossattention." + h) for o, h in _ATTN}
            layer["crossattention_ln"] = take.ln(src + "crossattention.output.LayerNorm")
        params[f"layer{i}"] = layer
    if mlm_prefix is not None:
        p = mlm_prefix + "predictions."
        params["mlm_transform"] = take.dense(p + "transform.dense")
        params["mlm_ln"] = take.ln(p + "transform.LayerNorm")
        params["mlm_bias"] = take(p + "bias")
        for tied in (p + "decoder.weight", p + "decoder.bias"):  # tied to word embeddings / equal to bias
            if take.has(tied):
                take.used.add(tied)
    return params


def model_kwargs_from_config(cfg: dict) -> dict:
    """HF config.json -> jaxboost.models.bert.Model fields."""
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} unsupported (expected 'gelu')")
    depth = cfg["num_hidden_layers"]
    cross = cfg.get("add_cross_attention", False)
    fusion = cfg.get("fusion_layer", 0 if cross else depth)
    return dict(vocab_size=cfg["vocab_size"], hidden=cfg["hidden_size"], depth=depth,
                num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
                max_position=cfg["max_position_embeddings"], type_vocab_size=cfg.get("type_vocab_size", 2),
                fusion_layer=fusion, causal=bool(cfg.get("is_decoder", False)),
                ln_eps=cfg.get("layer_norm_eps", 1e-12), dropout_rate=cfg.get("hidden_dropout_prob", 0.1),
                attention_dropout_rate=cfg.get("attention_probs_dropout_prob", 0.1))


def load_hf_bert(folder: str, mlm_head: bool | None = None):
    """Local HF folder -> (Model kwargs, params, unused tensor names). `mlm_head=None`: use it if present."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in BERT folder {folder}")
    with open(cfg_path) as f:
        kwargs = model_kwargs_from_config(json.load(f))
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            weights = os.path.join(folder, name)
            break
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
    sd = load_state_dict(weights)
    # BertModel saves bare names; BertForMaskedLM prefixes "bert." and adds "cls.".
    prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
    has_mlm = any(k.startswith("cls.predictions.") for k in sd)
    mlm_head = has_mlm if mlm_head is None else mlm_head
    take = _Taker(sd, weights)
    params = bert_params_from_state_dict(take, prefix, kwargs["depth"], kwargs["fusion_layer"],
                                         "cls." if mlm_head else None)
    unused = sorted(k for k in sd if k not in take.used)
    unexpected = [k for k in unused if not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ValueError(f"{weights}: tensors not mapped: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    return dict(kwargs, mlm_head=mlm_head), params, unused


def save_params(params, path: str) -> None:
    from flax import serialization
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(params))
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="local HF BERT folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="output .msgpack of jaxboost params")


def main(args) -> int:
    kwargs, params, unused = load_hf_bert(args.src)
    save_params(params, args.out)
    print(f"wrote {args.out}; model fields {kwargs}; skipped {unused}")
    return 0

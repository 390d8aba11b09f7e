"""HF BERT (local folder: config.json + model.safetensors or pytorch_model.bin) -> jaxboost.models.bert params.

  jaxboost convert bert --src bert-base-uncased --out runs/bert   # then --config.init.bert=runs/bert

The converted folder holds model.json (the model fields and what was skipped), variables.msgpack and, when
the HF folder has one, the tokenizer in tokenizer/. `load_bert` reads either kind of folder.

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


MODEL_NAME = "bert"


def write_component(out_dir: str, model_name: str, fields: dict, variables: dict, source: str,
                    skipped: list[str], tokenizer_dir: str = "") -> None:
    """out_dir/model.json + variables.msgpack (+ tokenizer/ copied from `tokenizer_dir`), written into a
    temporary sibling and renamed in, so a failed conversion leaves out_dir as it was."""
    import shutil
    import tempfile
    from jaxboost.convert.clip import save_converted
    from jaxboost.train import tokenizer_setup
    out_dir = os.path.abspath(out_dir)
    names = ["model.json", "variables.msgpack"] + ([tokenizer_setup.TOKENIZER_DIR] if tokenizer_dir else [])
    if any(os.path.exists(os.path.join(out_dir, n)) for n in names):
        raise ValueError(f"{out_dir} already holds a converted model (model.json); choose an empty --out folder")
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert_", dir=os.path.dirname(out_dir) or ".")
    try:
        save_converted(tmp, model_name, fields, variables)
        with open(os.path.join(tmp, "model.json")) as f:
            meta = json.load(f)
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(dict(meta, source=os.path.abspath(source), skipped=skipped), f, indent=1)
        if tokenizer_dir:
            tokenizer_setup.copier(tokenizer_dir)(os.path.join(tmp, tokenizer_setup.TOKENIZER_DIR))
        os.makedirs(out_dir, exist_ok=True)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_component(folder: str, model_name: str):
    """-> (fields, variables) of a `write_component` folder, or None when `folder` is not one of
    `model_name` (so callers can try the original format)."""
    from flax import serialization
    meta_path = os.path.join(folder, "model.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("model_name") != model_name:
        raise ValueError(f"{meta_path}: a converted {meta.get('model_name')!r} model, not a {model_name!r} one")
    with open(os.path.join(folder, "variables.msgpack"), "rb") as f:
        return meta["model"], serialization.msgpack_restore(f.read())


def is_hf_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, n)) for n in ("model.safetensors", "pytorch_model.bin"))


def load_bert(path: str):
    """A local HF BERT folder or a `jaxboost convert bert` folder -> (Model kwargs, params)."""
    converted = read_component(path, MODEL_NAME) if os.path.isdir(path) else None
    if converted is not None:
        return converted[0], converted[1]["params"]
    if os.path.isdir(path) and is_hf_folder(path):
        kwargs, params, _ = load_hf_bert(path)
        return kwargs, params
    raise ValueError(f"{path}: neither a Hugging Face BERT folder (config.json + model.safetensors or "
                     f"pytorch_model.bin) nor a `jaxboost convert bert` folder (model.json + variables.msgpack)")


def tokenizer_folder(path: str) -> str:
    """Where a BERT folder of either kind keeps its vocabulary: the HF folder itself, or tokenizer/ of a
    converted one ("" when it has none)."""
    from jaxboost.train import tokenizer_setup
    for folder in (os.path.join(path, tokenizer_setup.TOKENIZER_DIR), path):
        if tokenizer_setup.is_ready(folder):
            return folder
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="local HF BERT folder (config.json + weights [+ vocab.txt])")
    parser.add_argument("--out", required=True,
                        help="output folder (model.json + variables.msgpack + tokenizer/), for --config.init.bert")


def main(args) -> int:
    kwargs, params, unused = load_hf_bert(args.src)
    write_component(args.out, MODEL_NAME, kwargs, {"params": params}, args.src, unused,
                    tokenizer_folder(args.src))
    print(f"wrote {os.path.abspath(args.out)} (a converted BERT: --config.init.bert={args.out}); "
          f"model fields {kwargs}; skipped {unused or 'nothing'}")
    return 0

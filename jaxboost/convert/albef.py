"""ALBEF/MUMC PyTorch checkpoint (.pth via torch.load(weights_only=True), or .safetensors) -> MUMC params.

Pretraining checkpoints carry `visual_encoder.*` (MAE/timm ViT), `text_encoder.bert.*` + `text_encoder.cls.*`
(xbert BertForMaskedLM, cross-attention in layers >= fusion_layer), `vision_proj`, `text_proj`, `temp`,
`itm_head.{0,1,3}`, the momentum copies (`*_m`), `image_queue`/`text_queue` [E, Q] and `queue_ptr`.
VQA checkpoints carry `text_encoder.*` (BertModel) and `text_decoder.bert.*` + `text_decoder.cls.*`.
Every tensor is mapped or named: a missing one raises, unmapped ones are returned (and printed by the CLI).

  jaxboost convert albef --src ALBEF.pth --tokenizer bert-base-uncased --out runs/albef
  jaxboost train --config configs/mumc_pretrain.py:full --config.init.albef=runs/albef \
      --config.model.vision_posemb=table ...
  jaxboost train --config configs/mumc_vqa.py:full --config.init_from=runs/albef ...

A pretraining checkpoint becomes a MUMC pretraining run at step 0 (run_folder.py: config.json with the
architecture read from the weights, ckpt/0 with params, momentum encoders and queues, tokenizer/) plus
converted.json naming the parameters the checkpoint did not hold (ALBEF's two-layer ITM head, the queues of a
file without them): `init.albef` leaves those at the new run's own init, as it does reading the file.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from jaxboost.convert.bert import _Taker, bert_params_from_state_dict, load_state_dict
from jaxboost.convert.bert import tokenizer_folder
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


CONVERTED_INFO = "converted.json"


def fit_tables(start: dict, grid: int, source: str) -> dict:
    """Every learned position table of a starting point {"params", "momentum", ...} at the model's grid
    (MUMC's load_checkpoint runs interpolate_pos_embed on visual_encoder and visual_encoder_m)."""
    out = dict(start)
    for key in ("params", "momentum"):
        tree = start.get(key)
        if tree is not None and "pos_embedding" in tree.get("vision", {}):
            vision = dict(tree["vision"], pos_embedding=mumc_surgery.fit_position_table(
                tree["vision"]["pos_embedding"], grid, f"{source} {key} vision position table"))
            out[key] = dict(tree, vision=vision)
    return out


def _drop(tree: dict, paths) -> dict:
    """`tree` without the entries at `paths` ("/itm_fc1", "/vision/pos_embedding")."""
    out = dict(tree)
    for path in paths:
        keys, node = path.strip("/").split("/"), out
        for k in keys[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        node.pop(keys[-1], None)
    return out


def _start_from_run(folder: str) -> dict:
    """A MUMC pretraining run (a converted checkpoint or a trained run) -> its starting point, without the
    parameters converted.json names as not from the checkpoint."""
    import jax
    from jaxboost.train import runs
    from jaxboost import parallel
    # read on one device: the weights are needed on the host, whatever batch the folder's mesh would take
    run = runs.open_run(folder, prefer="latest", expect="mumc_pretrain",
                        mesh=parallel.make_mesh(1, 1, jax.devices()[:1]))
    state = jax.device_get(run.state)
    info_path = os.path.join(folder, CONVERTED_INFO)
    fresh = []
    if os.path.isfile(info_path):
        with open(info_path) as f:
            fresh = json.load(f)["fresh"]
    queues = None if "/queues" in fresh else state.extra["queues"]
    return {"params": _drop(state.params, [p for p in fresh if p != "/queues"]),
            "momentum": state.extra["momentum"], "queues": queues}


def load_pretrain_start(path: str, grid: int) -> dict:
    """ALBEF.pth / a MUMC checkpoint file, or a folder it was converted into (or a MUMC pretraining run) ->
    {"params", "momentum" (or None), "queues" (or None)} as numpy, position tables at `grid`."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path}: a folder but not a MUMC pretraining run (no config.json); give ALBEF.pth "
                             f"/ a MUMC checkpoint file or a `jaxboost convert albef` folder")
        return fit_tables(_start_from_run(path), grid, path)
    params, momentum, queues, _ = load_albef(path)
    return fit_tables({"params": params, "momentum": momentum, "queues": queues}, grid, path)


def _depth(tree: dict, prefix: str) -> int:
    return sum(k.startswith(prefix) and k[len(prefix):].isdigit() for k in tree)


def tower_fields(vision: dict, text: dict) -> dict:
    """The MUMC model fields the towers' weights fix (head counts and the image size come from the config)."""
    text_depth = _depth(text, "layer")
    fusion = min([i for i in range(text_depth) if "crossattention" in text[f"layer{i}"]], default=text_depth)
    emb = text["embeddings"]
    return dict(vision_width=int(vision["cls_token"].shape[-1]), vision_depth=_depth(vision, "block"),
                vision_mlp_dim=int(vision["block0"]["mlp"]["fc1"]["kernel"].shape[1]),
                patch_size=int(vision["patch_embed"]["kernel"].shape[0]), text_width=int(emb["ln"]["scale"].shape[0]),
                text_depth=text_depth, text_mlp_dim=int(text["layer0"]["intermediate"]["kernel"].shape[1]),
                fusion_layer=fusion, max_position=int(emb["position_embeddings"]["embedding"].shape[0]),
                vocab_size=int(emb["word_embeddings"]["embedding"].shape[0]))


def pretrain_fields(params: dict) -> dict:
    return dict(tower_fields(params["vision"], params["text"]),
                embed_dim=int(params["vision_proj"]["kernel"].shape[1]))


def pretrain_run_config(spec: str, overrides: list[str], params: dict, queues):
    """The run config `spec` with the checkpoint's architecture, no starting point of its own."""
    from ml_collections import ConfigDict
    from jaxboost.config import load_config
    config = ConfigDict(load_config(spec, overrides).to_dict())
    if config.get("trainer") != "mumc_pretrain":
        raise ValueError(f"--config {spec}: a {config.get('trainer')!r} config, not a MUMC pretraining one")
    config.model.update(pretrain_fields(params))
    if "pos_embedding" in params["vision"]:
        config.model.vision_posemb = "table"
    if queues is not None:
        config.queue_size = int(queues["image"].shape[0])
    config.init = dict(bert="", mae="", albef="")
    config.init_from, config.data.tokenizer, config.data.size = "", "", config.model.image_size
    return config


def _tokenizer_writer(source: str):
    """tmp -> writes the run's tokenizer from a vocab.txt, an HF BERT folder or a converted BERT folder."""
    from jaxboost.data.tokenize_bert import BertTokenizer
    from jaxboost.train import tokenizer_setup
    if os.path.isfile(source):
        return lambda tmp: BertTokenizer.from_vocab(source, 25).hf.save_pretrained(tmp)
    folder = tokenizer_folder(source) if os.path.isdir(source) else ""
    if not folder:
        raise FileNotFoundError(f"--tokenizer {source}: no vocab.txt / tokenizer.json there")
    return tokenizer_setup.copier(folder)


def write_pretrain_run(args) -> list[str]:
    """args.src -> a MUMC pretraining run folder args.out; returns the tensors not mapped."""
    import jax
    from jaxboost.convert.run_folder import write_run_folder
    from jaxboost.data.tokenize_bert import BertTokenizer
    from jaxboost.train import mumc_pretrain, tokenizer_setup
    params, momentum, queues, unmapped = load_albef(args.src)
    config = pretrain_run_config(args.config, args.set, params, queues)
    with tempfile.TemporaryDirectory() as tmp:
        _tokenizer_writer(args.tokenizer)(tmp)
        vocab = BertTokenizer.from_folder(tmp, 25).vocab_size
    model = mumc_pretrain.build_model(config, vocab)   # refuses a tokenizer larger than the vocabulary
    tx = mumc_pretrain.make_optimizer(config, 1, 1, frozen=mumc_pretrain.frozen_params(config))
    start = fit_tables({"params": params, "momentum": momentum, "queues": queues},
                       config.model.image_size // config.model.patch_size, args.src)
    state = jax.device_get(jax.jit(mumc_pretrain.make_init_fn(config, model, tx))(start))
    _, fresh = mumc_surgery.overlay_params(state.params, start["params"])
    fresh += ["/queues"] if queues is None else []

    def extras(tmp: str) -> list[str]:
        _tokenizer_writer(args.tokenizer)(os.path.join(tmp, tokenizer_setup.TOKENIZER_DIR))
        with open(os.path.join(tmp, CONVERTED_INFO), "w") as f:
            json.dump({"source": os.path.abspath(args.src), "fresh": fresh, "unmapped": unmapped}, f, indent=1)
        return [tokenizer_setup.TOKENIZER_DIR, CONVERTED_INFO]
    write_run_folder(args.out, config, state, extras)
    return unmapped


def write_vqa_run(args) -> list[str]:
    """A finetuned VQA checkpoint -> a MUMC VQA run folder at step 0 (`eval --workdir DIR
    --config.data.root=R` scores it; `init_from=DIR` continues finetuning it); returns the tensors not mapped.
    The momentum model starts as a copy of the params (the checkpoint's `*_m` copies are listed unmapped)."""
    import jax
    from ml_collections import ConfigDict
    from jaxboost.config import load_config
    from jaxboost.convert.run_folder import write_run_folder
    from jaxboost.train import mumc_vqa, tokenizer_setup
    params, fields, unmapped = load_albef(args.src, "vqa")
    config = ConfigDict(load_config(args.config or "configs/mumc_vqa.py:full", args.set).to_dict())
    if config.get("trainer") != "mumc_vqa":
        raise ValueError(f"--config {args.config}: a {config.get('trainer')!r} config, not a MUMC VQA one")
    config.model.update(tower_fields(params["vision"], params["text"]), **fields)
    config.init_from, config.data.tokenizer = "", ""
    model = mumc_vqa.build_model(config, config.model.vocab_size)
    fresh = jax.device_get(jax.jit(lambda: mumc_vqa.fresh_params(config, model))())
    params, missing = mumc_surgery.overlay_params(fresh, params)
    if missing:
        raise ValueError(f"{args.src}: the VQA checkpoint lacks {missing[:8]}")
    tx = mumc_vqa.make_optimizer(config, 1, 1)
    state = jax.device_get(mumc_vqa._state_fn(tx, lambda: (params, None), int(config.seed))())

    def extras(tmp: str) -> list[str]:
        _tokenizer_writer(args.tokenizer)(os.path.join(tmp, tokenizer_setup.TOKENIZER_DIR))
        with open(os.path.join(tmp, CONVERTED_INFO), "w") as f:
            json.dump({"source": os.path.abspath(args.src), "fresh": [], "unmapped": unmapped}, f, indent=1)
        return [tokenizer_setup.TOKENIZER_DIR, CONVERTED_INFO]
    write_run_folder(args.out, config, state, extras)
    return unmapped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="ALBEF/MUMC checkpoint (.pth or .safetensors)")
    parser.add_argument("--out", required=True,
                        help="output run folder (pretrain: for init.albef and a VQA init_from; vqa: for eval)")
    parser.add_argument("--target", default="pretrain", choices=["pretrain", "vqa"])
    parser.add_argument("--tokenizer", required=True,
                        help="bert-base-uncased's vocab.txt or a (HF or converted) BERT folder, copied into the "
                             "run (the checkpoints hold no vocabulary)")
    parser.add_argument("--config", default="",
                        help="run config recorded in the folder (default configs/mumc_pretrain.py:full or "
                             "configs/mumc_vqa.py:full); the architecture comes from the weights, the image "
                             "size from here (a table at another grid is resized)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.image_size=384")


def main(args) -> int:
    if args.target == "pretrain":
        args.config = args.config or "configs/mumc_pretrain.py:full"
        unmapped = write_pretrain_run(args)
        use = f"--config.init.albef={args.out} or a VQA --config.init_from={args.out}"
    else:
        unmapped = write_vqa_run(args)
        use = f"eval --workdir {args.out} --config.data.root=VQA_FOLDER"
    print(f"wrote {os.path.abspath(args.out)} (a MUMC {args.target} run at step 0: {use}); tensors not "
          f"mapped: {unmapped or 'none'}")
    return 0

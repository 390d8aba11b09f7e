"""Contrastive pretraining of a tiny CLIPSeg's two towers (CLIP's objective, Radford et al. 2021), so that a
CLIPSeg run can freeze towers that carry meaning, as CLIPSeg freezes a pretrained CLIP.

CLIPSeg conditions its decoder on the CLIP text embedding of the prompt (FiLM); random frozen towers give the
LV, MYO and LA prompts nearly one embedding, and the decoder cannot tell which structure to draw. Here each
training record becomes a region/caption pair: the image with everything outside the structure darkened
(CLIPSeg's own visual-prompt engineering found background darkening among the best ways to point CLIP at a
region) and one of the record's prompts (P1-P7, either ending). The loss is CLIP's symmetric cross-entropy
over the batch's image-text similarities, with every pair of the same structure a positive (the captions of
two LV records are both right for either image).

  jaxboost train --config configs/clip_towers.py:demo --workdir runs/towers --config.data.corpus=CORPUS
writes WORKDIR/towers (a `jaxboost convert clipseg`-style folder: model.json + variables.msgpack with only
the towers; the decoder initialises fresh) and WORKDIR/tokenizer; a CLIPSeg run uses them through
--config.pretrained=WORKDIR/towers --config.data.tokenizer=WORKDIR/tokenizer.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxboost import config as config_lib
from jaxboost.convert.clip import fill_missing, load_converted, save_converted
from jaxboost.data import corpus as corpus_lib
from jaxboost.data.tokenize_clip import ClipTokenizer
from jaxboost.losses.contrastive import clip_loss
from jaxboost.models import clip, vit
from jaxboost.train import vl_seg

TOWERS_DIR, TOKENIZER_DIR = "towers", "tokenizer"


class Towers(nn.Module):
    """CLIPSeg's vision and text towers, built and named as models/clipseg.py builds them (so their
    parameters load into it), plus CLIP's image head (post-LN + projection of the class token), which CLIPSeg
    does not use and the saved folder leaves out."""
    seg: dict   # the CLIPSeg model fields

    @nn.compact
    def __call__(self, pixel_values, input_ids, attention_mask):
        s = self.seg
        vision = clip.clip_vit(s["vision_width"], max(s["extract_layers"]) + 1, s["vision_heads"],
                               s["vision_mlp_dim"], s["patch_size"], s["vision_image_size"], final_norm=False,
                               name="vision")
        _, hidden = vision(pixel_values, output_hidden_states=True)
        image = nn.LayerNorm(epsilon=1e-5, name="post_layernorm")(hidden[-1][:, 0])
        image = nn.Dense(s["projection_dim"], use_bias=False, name="visual_projection")(image)
        _, text = clip.TextEncoder(s["vocab_size"], s["text_width"], s["text_depth"], s["text_heads"],
                                   s["text_mlp_dim"], s["context_length"], s["projection_dim"],
                                   s["eos_token_id"], name="text")(input_ids, attention_mask)
        return image, text


def region_pairs(corpus_dir: str, size: int, background: float):
    """(images [N, size, size] float in [0, 1] with the background scaled by `background`, labels [N],
    prompts [N] lists of the P1-P7 texts) of the corpus's training split."""
    images, labels, prompts = [], [], []
    for r in corpus_lib.open_corpus(corpus_dir).iter("train"):
        image, mask = np.asarray(r["image"]), np.asarray(r["mask"])
        if image.shape[0] != size:
            image, mask = corpus_lib.resize(image, size, False), corpus_lib.resize(mask, size, True)
        inside = mask == int(r["label"])
        images.append(image.astype(np.float32) / 255.0 * np.where(inside, 1.0, background))
        labels.append(int(r["label"]))
        prompts.append([t for pair in r["prompts"][1:] for t in pair if t])
    return np.stack(images), np.asarray(labels, np.int32), prompts


def _batches(images, labels, prompts, batch: int, seed: int):
    """Endless shuffled batches; each visit draws one of the record's prompts."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield images[idx], labels[idx], [prompts[j][rng.integers(len(prompts[j]))] for j in idx]


def sincos_table(shape) -> np.ndarray:
    """[1 + g*g, D]: a zero row for the class token, then the 2-D sin-cos table of the g x g patch grid."""
    grid = int(round((shape[0] - 1) ** 0.5))
    return np.concatenate([np.zeros((1, shape[1]), np.float32),
                           np.asarray(vit.sincos_2d_posemb(grid, shape[1]), np.float32)])


def make_step(towers: Towers, tx, mean, std):
    def loss_fn(params, images, ids, mask, labels):
        pixels = (jnp.repeat(images[..., None], 3, -1) - mean) / std
        image_emb, text_emb = towers.apply({"params": params["towers"]}, pixels, ids, mask)
        return clip_loss(image_emb, text_emb, labels, params["logit_scale"])

    @jax.jit
    def step(params, opt_state, images, ids, mask, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, ids, mask, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # CLIP clips the learned temperature at 100
        params["logit_scale"] = jnp.minimum(params["logit_scale"], np.log(100.0))
        return params, opt_state, loss
    return step


def segmenter_config(config, seg=None):
    """The CLIPSeg config whose towers these are: `seg`, else config.segmenter."""
    seg = seg or config_lib.load_config(config.segmenter)
    if seg.model_name != "clipseg":
        raise ValueError(f"config.segmenter={config.segmenter}: a {seg.model_name!r} config, not a clipseg one")
    return seg


def seg_fields(seg, tokenizer: ClipTokenizer) -> dict:
    """The CLIPSeg model fields, vocab_size the tokenizer's (what the saved model.json records)."""
    fields = vl_seg._tuples(dict(seg.model))
    fields["vocab_size"] = fields.get("vocab_size") or tokenizer.vocab_size
    return fields


def train(config, workdir, segmenter=None) -> dict:
    """Pretrain the towers of config.segmenter (or of the CLIPSeg config `segmenter`); write WORKDIR/towers,
    WORKDIR/tokenizer and WORKDIR/summary.json."""
    workdir = Path(workdir)
    t0 = time.time()
    seg = segmenter_config(config, segmenter)
    tokenizer = ClipTokenizer.train(vl_seg.corpus_prompts(config.data.corpus), str(workdir / TOKENIZER_DIR),
                                    int(seg.data.tokenizer_vocab_size), int(seg.model.context_length))
    fields = seg_fields(seg, tokenizer)
    towers = Towers({k: fields[k] for k in fields if k != "dtype"})
    images, labels, prompts = region_pairs(config.data.corpus, int(seg.data.size), float(config.data.background))
    size = images.shape[1]
    ids0, mask0 = tokenizer.tokenize(prompts[0][:1], fields["context_length"])
    shapes = jax.eval_shape(towers.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), ids0, mask0)
    towers_params = fill_missing({}, shapes, int(config.seed))["params"]
    if config.posemb_init == "sincos2d":
        towers_params["vision"]["pos_embedding"] = sincos_table(towers_params["vision"]["pos_embedding"].shape)
    params = {"towers": towers_params,
              "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}   # CLIP's initial temperature 0.07
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.cosine_decay_schedule(float(config.lr), int(config.steps)),
                                 weight_decay=float(config.weight_decay)))
    opt_state = tx.init(params)
    step = make_step(towers, tx, jnp.asarray(seg.data.mean), jnp.asarray(seg.data.std))
    losses = []
    for i, (im, lab, texts) in zip(range(int(config.steps)),
                                   _batches(images, labels, prompts, int(config.batch_size), int(config.seed))):
        ids, mask = tokenizer.tokenize(texts, fields["context_length"])
        params, opt_state, loss = step(params, opt_state, jnp.asarray(im), ids, mask, jnp.asarray(lab))
        losses.append(float(loss))
    keep = {k: v for k, v in traverse_util.flatten_dict(params["towers"], sep="/").items()
            if k.startswith(("vision/", "text/"))}
    save_converted(str(workdir / TOWERS_DIR), "clipseg", fields,
                   {"params": jax.tree.map(np.asarray, traverse_util.unflatten_dict(keep, sep="/"))})
    summary = {"steps": int(config.steps), "pairs": int(len(images)), "loss_first": losses[0],
               "loss_last": float(np.mean(losses[-10:])), "logit_scale": float(params["logit_scale"]),
               "wall_s": time.time() - t0, **prompt_separation(workdir, config)}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def prompt_separation(workdir, config, prompt: int = 3) -> dict:
    """Cosine similarity of the saved text tower's LV/MYO/LA embeddings of P`prompt` (what CLIPSeg's FiLM
    sees): near 1 means the decoder cannot tell the structures apart."""
    module, variables = load_converted(str(Path(workdir) / TOWERS_DIR))
    tokenizer = ClipTokenizer.from_folder(str(Path(workdir) / TOKENIZER_DIR), module.context_length)
    texts = {}
    for r in corpus_lib.open_corpus(config.data.corpus).iter("train", arrays=False):
        texts.setdefault(r["structure"], r["prompts"][prompt][0])
    names = sorted(texts)
    ids, mask = tokenizer.tokenize([texts[n] for n in names], module.context_length)
    text = clip.TextEncoder(module.vocab_size, module.text_width, module.text_depth, module.text_heads,
                            module.text_mlp_dim, module.context_length, module.projection_dim, module.eos_token_id)
    _, emb = text.apply({"params": variables["params"]["text"]}, ids, mask)
    emb = np.asarray(emb) / np.linalg.norm(np.asarray(emb), axis=-1, keepdims=True)
    return {f"cos_{a}_{b}": float(emb[i] @ emb[j]) for i, a in enumerate(names) for j, b in enumerate(names) if i < j}

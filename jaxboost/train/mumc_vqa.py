"""MUMC VQA finetuning and evaluation (SPEC B3) on a VQA-RAD-format folder (VQA-RAD, SLAKE, PathVQA, echo-VQA).

  jaxboost train --config configs/mumc_vqa.py:tiny --workdir runs/vqa --config.data.root=ECHO_VQA \
      --config.init_from=runs/mumc_pt
  jaxboost eval --config configs/mumc_vqa.py:tiny --workdir runs/vqa --split test

`init_from` names a MUMC pretraining workdir: its params are mapped into the VQA model
(`vqa_params_from_pretrain`: ViT with an explicit position table, 12-layer encoder, answer decoder from layers
fusion_layer..) and its tokenizer is reused; without it the model starts from scratch with a WordPiece
trained on the questions and answers (saved in WORKDIR/tokenizer).
Training: answer LM loss distilled from an EMA copy of the whole model (alpha 0.4 ramped over the first
epoch as ALBEF, EMA 0.995; the copy lives in `state.extra["momentum"]` and is checkpointed).
Answering ranks the candidates (top-k by first-token probability, re-ranked by full-answer likelihood).
Protocols (`config.protocol`): "fixed" = candidates from the training answers, strict exact match, best
checkpoint chosen on validation; "original" = the public answer list (with test answers), the lenient
match, and the best checkpoint chosen on the test split (the public protocol, for comparison only).
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from jaxboost import parallel
from jaxboost.data import caption_augment, vqa as vqa_lib
from jaxboost.data.tokenize_bert import BertTokenizer
from jaxboost.losses import contrastive
from jaxboost.models import mumc
from jaxboost.train import loop, mumc_pretrain


# ------------------------------------------------------------------------------------------------ data
class ImageCache:
    """Decoded, resized, normalised images by path (VQA sets are small; each image is read once)."""

    def __init__(self, size: int):
        self.size, self._cache = size, {}

    def __call__(self, path: Path) -> np.ndarray:
        if path not in self._cache:
            if not path.is_file():
                raise FileNotFoundError(f"VQA image not found: {path}")
            with Image.open(path) as im:
                pixels = caption_augment.pretrain_augment(np.asarray(im.convert("RGB")), None, self.size)
            self._cache[path] = caption_augment.normalize(pixels)
        return self._cache[path]


class VQASource:
    """grain source: item index -> {images, question_ids, question_mask, answer_ids, answer_mask}.

    Text is tokenized once up front: grain reads records on several threads and a HF fast tokenizer's
    padding/truncation settings are shared state (two lengths in flight would mix)."""

    def __init__(self, items, images: ImageCache, tokenizer: BertTokenizer, q_len: int, a_len: int):
        self.items, self.images = list(items), images
        self.q, self.qm = tokenizer.tokenize([it.question for it in self.items], q_len)
        self.a, self.am = tokenizer.tokenize([it.answer for it in self.items], a_len)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        i = int(index)
        return {"images": self.images(self.items[i].image_path), "question_ids": self.q[i],
                "question_mask": self.qm[i], "answer_ids": self.a[i], "answer_mask": self.am[i]}


def train_loader(source: VQASource, config):
    b = config.batch_size
    sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.ShardByJaxProcess(drop_remainder=True),
                                 shuffle=True, num_epochs=None, seed=config.seed)
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[grain.Batch(b // jax.process_count(), drop_remainder=True)],
                            shard_options=grain.ShardByJaxProcess(drop_remainder=True))


def vqa_texts(config) -> list[str]:
    items = vqa_lib.load_vqa(config.data.root, "train", image_dir=config.data.image_dir,
                             val_fraction=config.data.val_fraction, seed=config.seed)
    return sorted({it.question for it in items} | {it.answer for it in items})


# ------------------------------------------------------------------------------------------------ model
def build_model(config, vocab_size: int) -> mumc.VQAModel:
    fields = dict(config.model)
    fields["vocab_size"] = fields.get("vocab_size") or vocab_size
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = jnp.dtype(fields["dtype"])
    return mumc.VQAModel(**fields)


def fresh_params(config, model: mumc.VQAModel):
    size = config.model.image_size
    ids = jnp.zeros((1, 4), jnp.int32)
    return model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3)), ids, jnp.ones_like(ids),
                      ids, jnp.ones_like(ids))["params"]


def pretrained_params(config, model, pretrain_workdir):
    """Pretraining workdir -> (VQA params mapped from its latest params, its tokenizer)."""
    pt_config = mumc_pretrain.load_run_config(pretrain_workdir)
    pt_config, tokenizer, _, state, step = mumc_pretrain.restore(pt_config, pretrain_workdir)
    m = pt_config.model
    mapped = mumc.vqa_params_from_pretrain(jax.device_get(state.params), m.image_size // m.patch_size,
                                           first_layer=m.fusion_layer, decoder_depth=config.model.decoder_depth)
    base = jax.eval_shape(lambda: fresh_params(config, model))
    base = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), base)
    params, kept = mumc.overlay_params(base, mapped)
    if kept:
        raise ValueError(f"pretraining run {pretrain_workdir} lacks VQA parameters {kept[:8]}")
    print(f"[mumc_vqa] initialised from {pretrain_workdir} (step {step})", flush=True)
    return params, tokenizer


def get_tokenizer(config, workdir):
    """The run's vocabulary, recorded in WORKDIR/tokenizer: a copy of `data.tokenizer` (a folder) or of the
    pretraining run's (init_from); else a vocab.txt; else a WordPiece trained on the questions and answers."""
    init_from = config.get("init_from", "")
    length = config.data.max_question_tokens
    own = Path(workdir) / mumc_pretrain.TOKENIZER_DIR
    source = config.data.get("tokenizer", "") or (str(Path(init_from) / mumc_pretrain.TOKENIZER_DIR) if init_from else "")
    if not own.is_dir() and source and Path(source).is_dir():
        shutil.copytree(source, own)   # the finetune workdir records the vocabulary it was trained with
    elif init_from and not source:
        raise FileNotFoundError(f"{source}: the pretraining run's tokenizer is missing")
    if own.is_dir() or not source:
        return mumc_pretrain.get_tokenizer(_no_source(config),
                                           workdir, lambda: vqa_texts(config), length)
    return BertTokenizer.from_vocab(source, length)


def _no_source(config):
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.tokenizer = ""
    return c


# ------------------------------------------------------------------------------------------------ answering
def selection_split(config) -> str:
    return "test" if config.protocol == "original" else "val"


def candidate_answers(config, train_items):
    cands = vqa_lib.answer_candidates(config.data.root, config.protocol, train_items)
    if not cands:
        raise ValueError(f"{config.data.root}: no candidate answers")
    return cands


def predict(config, model, params, tokenizer, items, candidates, mesh, images: ImageCache) -> list[str]:
    """Ranked-candidate answer for each item."""
    a_ids, a_mask = tokenizer.tokenize(candidates, config.data.max_answer_tokens)
    a_ids, a_mask = jnp.asarray(a_ids), jnp.asarray(a_mask)
    k = min(int(config.top_k), len(candidates))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = max(shards, (config.get("eval_batch_size", config.batch_size) // shards) * shards)

    def fn(p, batch):
        states = model.apply({"params": p}, batch["images"], batch["question_ids"], batch["question_mask"],
                             method=mumc.VQAModel.encode_question)
        order, _ = mumc.rank_answers(model, p, states, batch["question_mask"], a_ids, a_mask, k)
        return order[:, 0]

    def batches():
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            q, qm = tokenizer.tokenize([it.question for it in chunk], config.data.max_question_tokens)
            yield {"images": np.stack([images(it.image_path) for it in chunk]), "question_ids": q,
                   "question_mask": qm}

    best = [int(j) for _, out in loop.map_batches(fn, params, batches(), mesh, bs) for j in out]
    return [candidates[j] for j in best]


def evaluate_split(config, model, params, tokenizer, split, mesh, images, candidates) -> dict:
    items = vqa_lib.load_vqa(config.data.root, split, image_dir=config.data.image_dir,
                             val_fraction=config.data.val_fraction, seed=config.seed)
    if not items:
        raise ValueError(f"{config.data.root}: split {split!r} is empty")
    preds = predict(config, model, params, tokenizer, items, candidates, mesh, images)
    acc = vqa_lib.accuracy(preds, items, config.protocol)
    return {f"{split}_{k}": float(v) for k, v in acc.items()}


# ------------------------------------------------------------------------------------------------ training
def make_step_fn(config, model, tx, epoch_steps: int):
    def step_fn(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        alpha = contrastive.alpha_ramp(state.step, epoch_steps, config.alpha, 1.0)
        momentum = state.extra["momentum"]
        loss_fn = lambda p: mumc.vqa_loss(model, p, momentum, batch, rng, alpha)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        momentum = jax.tree.map(lambda m, p: config.momentum * m + (1.0 - config.momentum) * p, momentum, params)
        metrics = {"loss": loss, "alpha": alpha, "grad_norm": optax.global_norm(grads),
                   "lr_scale": opt_state.hyperparams["lr_scale"]}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             extra={"momentum": momentum}), metrics
    return step_fn


def _state_fn(config, tx, params_fn):
    def init_fn():
        params = params_fn()
        return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(config.seed + 1),
                               extra={"momentum": jax.tree.map(jnp.array, params)})
    return init_fn


def setup(config, workdir):
    if config.protocol not in vqa_lib.PROTOCOLS:
        raise ValueError(f"config.protocol must be one of {sorted(vqa_lib.PROTOCOLS)}, got {config.protocol!r}")
    if not config.data.get("root"):
        raise ValueError("config.data.root (a VQA-RAD-format folder) is required")
    mesh = parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, config.batch_size)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer(config, workdir)
    train_items = vqa_lib.load_vqa(config.data.root, "train", image_dir=config.data.image_dir,
                                   val_fraction=config.data.val_fraction, seed=config.seed)
    candidates = candidate_answers(config, train_items)
    config = ml_collections.ConfigDict(config.to_dict())
    epoch_steps = max(1, len(train_items) // config.batch_size)
    if not config.total_steps:
        config.total_steps = int(config.epochs) * epoch_steps
    model = build_model(config, tokenizer.vocab_size)
    return config, mesh, tokenizer, train_items, candidates, epoch_steps, model


def train(config, workdir):
    init_from = config.get("init_from", "") or ""
    config, mesh, tokenizer, train_items, candidates, epoch_steps, model = setup(config, workdir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unanswerable = vqa_lib.count_unanswerable(train_items, candidates, "training questions")
    for w in caught:
        print(f"[mumc_vqa] warning: {w.message}", flush=True)
    tx = loop.make_optimizer(config, config.total_steps, epoch_steps)
    if init_from:
        start, _ = pretrained_params(config, model, init_from)
        params_fn = lambda: jax.tree.map(jnp.asarray, start)
    else:
        params_fn = lambda: fresh_params(config, model)
    images = ImageCache(config.data.size)
    source = VQASource(train_items, images, tokenizer, config.data.max_question_tokens, config.data.max_answer_tokens)
    split = selection_split(config)
    fit_config = ml_collections.ConfigDict(config.to_dict())
    fit_config.init_from = ""   # mapped here: the pretraining tree is not the VQA tree
    fit_config.best_metric = f"{split}_overall"
    eval_fn = lambda state: evaluate_split(config, model, state.params, tokenizer, split, mesh, images, candidates)
    _, summary = loop.fit(fit_config, workdir, init_fn=_state_fn(config, tx, params_fn),
                          step_fn=make_step_fn(config, model, tx, epoch_steps), train_iter=iter(train_loader(source, config)),
                          eval_fn=eval_fn, mesh=mesh)
    summary.update(unanswerable_train=unanswerable, candidates=len(candidates), init_from=init_from,
                   selection_split=split)
    return summary


def evaluate(config, workdir, split: str = "test") -> dict:
    """Accuracy of the best checkpoint (selected on validation, or on test for protocol 'original')."""
    workdir = Path(workdir)
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = ""   # the workdir's own tokenizer (copied from the pretraining run) and checkpoint
    config, mesh, tokenizer, train_items, candidates, epoch_steps, model = setup(config, workdir)
    tx = loop.make_optimizer(config, config.total_steps, epoch_steps)
    abstract = jax.eval_shape(_state_fn(config, tx, lambda: fresh_params(config, model)))
    state, _, step = loop.load_params(workdir, abstract, prefer="best")
    images = ImageCache(config.data.size)
    result = evaluate_split(config, model, state.params, tokenizer, split, mesh, images, candidates)
    print(f"MUMC VQA {workdir.name} step {step}, {split} ({config.protocol} protocol, {len(candidates)} candidates)")
    print(f"  {'':16s} {'accuracy':>9s} {'n':>6s}")
    rows = [("overall", "n"), ("open", "n_open"), ("closed", "n_closed")]
    rows += [(k[len(split) + 1:], f"n_{k[len(split) + 1:]}") for k in result if k.startswith(f"{split}_type/")]
    for kind, n in rows:
        print(f"  {kind:16s} {100 * result[f'{split}_{kind}']:8.1f}% {int(result[f'{split}_{n}']):6d}")
    return result

"""MUMC VQA finetuning and evaluation (Li et al. 2023) on a VQA-RAD-format folder (VQA-RAD, SLAKE, PathVQA, echo-VQA).

  jaxboost train --config configs/mumc_vqa.py:tiny --workdir runs/vqa --config.data.root=ECHO_VQA \
      --config.init_from=runs/mumc_pt
  jaxboost eval --config configs/mumc_vqa.py:tiny --workdir runs/vqa --split test

`init_from` names a MUMC pretraining workdir (or a `jaxboost convert albef` folder): its params are mapped
into the VQA model (`vqa_params_from_pretrain`: ViT with an explicit position table, resized to
`pretrain_image_size` if stored at another grid, 12-layer encoder, answer decoder from layers fusion_layer..)
and its tokenizer is reused; a VQA run (`convert albef --target vqa`) is loaded as it is; without init_from
the model starts from scratch with a WordPiece trained on the questions and answers (in WORKDIR/tokenizer).
Training: answer LM loss distilled from an EMA copy of the whole model (alpha 0.4 ramped over the first
epoch as ALBEF, EMA 0.995; the copy lives in `state.extra["momentum"]` and is checkpointed).
Answering ranks the candidates (top-k by first-token probability, re-ranked by full-answer likelihood).
Protocols (`config.protocol`): "fixed" = candidates from the training answers, strict exact match, best
checkpoint chosen on validation; "original" = the public answer list (with test answers), the lenient
match, and the best checkpoint chosen on the test split (the public protocol, for comparison only).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jaxboost import parallel
from jaxboost.data import caption_augment, pipeline, vqa as vqa_lib
from jaxboost.data.tokenize_bert import BertTokenizer
from jaxboost.losses import contrastive
from jaxboost.losses import mumc as mumc_losses
from jaxboost.models import mumc, mumc_answers, mumc_surgery
from jaxboost.train import evaluator, loop, mumc_pretrain, runs, tokenizer_setup
from jaxboost.train import workdir as workdir_lib
from jaxboost.train import optim
from jaxboost.train.optim import make_optimizer
from jaxboost.train.state import ema_update, initial_state
from jaxboost.train.task import RunLength, Task, compute_dtype


# ------------------------------------------------------------------------------------------------ data
class ImageCache:
    """Decoded, resized, normalised images by path (VQA sets are small; each image is read once)."""

    def __init__(self, size: int):
        self.size, self._cache = size, {}

    def __call__(self, path: Path) -> np.ndarray:
        if path not in self._cache:
            pixels = caption_augment.pretrain_augment(self.decoded(path), None, self.size)
            self._cache[path] = caption_augment.normalize(pixels)
        return self._cache[path]

    def decoded(self, path: Path) -> np.ndarray:
        """uint8 [H, W, 3] as stored (the augmented training view is cut from it)."""
        if not path.is_file():
            raise FileNotFoundError(f"VQA image not found: {path}")
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))


@optim.SCHEDULES.register("mumc_epoch_cosine")
def mumc_epoch_cosine(o, total_steps: int, steps_per_epoch: int):
    """MUMC's VQA.py cosine_lr_schedule, set once per epoch: min_lr + (lr - min_lr) * (1 + cos(pi e / E)) / 2
    for epoch e of E, with its floor min_lr = 1e-8."""
    per_epoch = max(steps_per_epoch, 1)
    epochs, low = max(total_steps // per_epoch, 1), o.get("min_lr", 1e-8)
    return lambda step: low + (o.lr - low) * 0.5 * (1 + jnp.cos(jnp.pi * (step // per_epoch) / epochs))


def tokenize_questions(tokenizer: BertTokenizer, questions, max_tokens: int):
    """MUMC's VQA question input: pre_question, then "[CLS] q" with no [SEP], cut at `max_tokens` tokens."""
    enc = tokenizer.hf([vqa_lib.pre_question(q) for q in questions], add_special_tokens=False, truncation=True,
                       max_length=max_tokens - 1, padding="max_length")
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    ones = np.ones((len(ids), 1), np.int32)
    return np.concatenate([ones * tokenizer.cls_id, ids], 1), np.concatenate([ones, mask], 1)


def tokenize_answers(tokenizer: BertTokenizer, answers, max_tokens: int = 0):
    """"[CLS] answer [SEP]" padded; `max_tokens=0`: untruncated, as MUMC (the longest answer sets the length)."""
    answers = list(answers)
    longest = max((len(tokenizer.hf(a)["input_ids"]) for a in answers), default=2)
    return tokenizer.tokenize(answers, max_tokens or longest)


class VQASource:
    """grain source: item index -> {images, question_ids, question_mask, answer_ids, answer_mask}.

    Text is tokenized once up front: grain reads records on several threads and a HF fast tokenizer's
    padding/truncation settings are shared state (two lengths in flight would mix)."""

    def __init__(self, items, images: ImageCache, tokenizer: BertTokenizer, q_len: int, a_len: int,
                 decoded: bool = False):
        self.items, self.images, self.decoded = list(items), images, decoded
        self.q, self.qm = tokenize_questions(tokenizer, [it.question for it in self.items], q_len)
        self.a, self.am = tokenize_answers(tokenizer, [it.answer for it in self.items], a_len)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        i, path = int(index), self.items[int(index)].image_path
        image = self.images.decoded(path) if self.decoded else self.images(path)
        return {"images": image, "question_ids": self.q[i],
                "question_mask": self.qm[i], "answer_ids": self.a[i], "answer_mask": self.am[i]}


class _AugmentImage(grain.RandomMapTransform):
    """MUMC's VQA training view (VQA.py's train transform): random resized crop, flip, RandAugment."""

    def __init__(self, config):
        self.config = config

    def random_map(self, element, rng):
        # uint8 to the step (`pipeline.device_preprocess` normalises it there) unless data.host_uint8=False;
        # with data.augment_at="device" the crop and flip too
        return dict(element, **mumc_pretrain.augmented_view(element["images"], rng, self.config))


def train_loader(source: VQASource, config):
    """The corpus loader's host slicing: global batch k is the same on 1, 2 or 4 hosts, each host reading its
    rows of it (grain's ShardByJaxProcess would give every host count other batches). A source of decoded
    images gets the augmented view (per-record rng from grain)."""
    operations = [_AugmentImage(config)] if source.decoded else []
    return mumc_pretrain.host_sliced_loader(source, global_batch_size=config.batch_size, seed=config.seed,
                                            operations=operations, **pipeline.loader_options(config))


def vqa_texts(config) -> list[str]:
    items = vqa_lib.load_vqa(config.data.root, "train", image_dir=config.data.image_dir,
                             val_fraction=config.data.val_fraction, seed=config.seed)
    return sorted({it.question for it in items} | {it.answer for it in items})


# ------------------------------------------------------------------------------------------------ model
def build_model(config, vocab_size: int) -> mumc.VQAModel:
    fields = dict(config.model)
    fields["vocab_size"] = fields.get("vocab_size") or vocab_size
    fields["dtype"] = compute_dtype(config)
    return mumc.VQAModel(**fields)


def fresh_params(config, model: mumc.VQAModel):
    size = config.model.image_size
    ids = jnp.zeros((1, 4), jnp.int32)
    return model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3)), ids, jnp.ones_like(ids),
                      ids, jnp.ones_like(ids))["params"]


def pretrained_params(config, model, pretrain_workdir):
    """Pretraining workdir -> (VQA params mapped from its latest params, the VQA momentum model mapped from
    its momentum encoders, its tokenizer). MUMC's VQA.py loads the pretraining checkpoint's `*_m` tensors into
    the VQA model's momentum copies (its answer decoder's from the momentum text encoder's layers 6-11)."""
    # read on one device (the trees are mapped on the host), whatever batch the pretraining mesh took
    run = runs.open_run(pretrain_workdir, prefer="latest", expect="mumc_pretrain",
                        mesh=parallel.make_mesh(1, 1, jax.devices()[:1]))
    tokenizer, state, step, m = run.task.tokenizer, run.state, run.step, run.config.model
    base = jax.eval_shape(lambda: fresh_params(config, model))
    base = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), base)
    table_grid = config.model.pretrain_image_size // config.model.patch_size

    def to_vqa(tree, what):
        # a table stored at another grid than this model's pretrain_image_size is resized as MUMC's
        # train_vqa.py does (interpolate_pos_embed) rather than refused
        mapped = mumc_surgery.vqa_params_from_pretrain(
            jax.device_get(tree), m.image_size // m.patch_size, first_layer=m.fusion_layer,
            decoder_depth=config.model.decoder_depth, table_grid=table_grid)
        params, kept = mumc_surgery.overlay_params(base, mapped)
        if kept:
            raise ValueError(f"pretraining run {pretrain_workdir}: its {what} lack VQA parameters {kept[:8]}")
        return params

    params, momentum = to_vqa(state.params, "params"), to_vqa(state.extra["momentum"], "momentum encoders")
    print(f"[mumc_vqa] initialised from {pretrain_workdir} (step {step}), momentum model from its momentum "
          f"encoders", flush=True)
    return params, momentum, tokenizer


def get_tokenizer(config, workdir, *, use_init_from: bool = True):
    """The run's vocabulary in WORKDIR/tokenizer: a copy of `data.tokenizer` (a folder or vocab.txt) or of the
    pretraining run's (init_from); else a WordPiece built from the questions and answers."""
    init_from = config.get("init_from", "") if use_init_from else ""
    length = config.data.max_question_tokens
    if init_from and not config.data.get("tokenizer", ""):
        source = Path(init_from) / tokenizer_setup.TOKENIZER_DIR
        if not tokenizer_setup.is_ready(source):
            raise FileNotFoundError(f"{source}: the pretraining run's tokenizer is missing")
        return BertTokenizer.from_folder(tokenizer_setup.run_tokenizer_dir(workdir, tokenizer_setup.copier(source)),
                                         length)
    return mumc_pretrain.get_tokenizer(config, workdir, lambda: vqa_texts(config), length)


# ------------------------------------------------------------------------------------------------ answering
def selection_split(config) -> str:
    return "test" if config.protocol == "original" else "val"


def candidate_answers(config, train_items):
    cands = vqa_lib.answer_candidates(config.data.root, config.protocol, train_items)
    if not cands:
        raise ValueError(f"{config.data.root}: no candidate answers")
    return cands


def make_predictor(config, model, tokenizer, candidates, mesh):
    """(params, items, images) -> the ranked-candidate answer of each item; compiled once."""
    a_ids, a_mask = tokenize_answers(tokenizer, candidates, config.data.max_answer_tokens)
    a_ids, a_mask = jnp.asarray(a_ids), jnp.asarray(a_mask)
    k = min(int(config.top_k), len(candidates))
    bs = evaluator.eval_batch_size(config, mesh)

    def fn(p, batch):
        states = model.apply({"params": p}, batch["images"], batch["question_ids"], batch["question_mask"],
                             method=mumc.VQAModel.encode_question)
        order, _ = mumc_answers.rank_answers(model, p, states, batch["question_mask"], a_ids, a_mask, k)
        return order[:, 0]

    mapper = evaluator.BatchMapper(fn, mesh, bs)

    def predict(params, items, images: ImageCache) -> list[str]:
        def batches():
            for i in range(0, len(items), bs):
                chunk = items[i:i + bs]
                q, qm = tokenize_questions(tokenizer, [it.question for it in chunk], config.data.max_question_tokens)
                yield {"images": np.stack([images(it.image_path) for it in chunk]), "question_ids": q,
                       "question_mask": qm}
        return [candidates[int(j)] for _, out in mapper(params, batches()) for j in out]
    return predict


def make_evaluator(config, predict, images: ImageCache):
    """(params, split) -> {split}/overall, /open, /closed, per question type (accuracy; named as the other
    tasks' metrics, e.g. val/dice_mean)."""
    def evaluate(params, split: str) -> dict:
        items = vqa_lib.load_vqa(config.data.root, split, image_dir=config.data.image_dir,
                                 val_fraction=config.data.val_fraction, seed=config.seed)
        if not items:
            raise ValueError(f"{config.data.root}: split {split!r} is empty")
        acc = vqa_lib.accuracy(predict(params, items, images), items, config.protocol)
        return {f"{split}/{k}": float(v) for k, v in acc.items()}
    return evaluate


# ------------------------------------------------------------------------------------------------ training
def make_loss_fn(config, model, epoch_steps: int):
    """Answer LM loss distilled from the momentum model (alpha ramped over the first epoch, as ALBEF)."""
    def loss_fn(params, state, batch, rng):
        batch = pipeline.device_preprocess(batch, config)  # uint8 views are normalised here, on device
        alpha = contrastive.alpha_ramp(state.step, epoch_steps, config.alpha, 1.0)
        loss, _ = mumc_losses.vqa_loss(model, params, state.extra["momentum"], batch, rng, alpha,
                                teacher_deterministic=not config.get("teacher_dropout", True))
        return loss, ({"alpha": alpha}, None)
    return loss_fn


def momentum_post_update(config):
    def post_update(old, new, aux):
        return new.replace(extra={"momentum": ema_update(old.extra["momentum"], new.params, config.momentum)}), {}
    return post_update


def _state_fn(tx, start_fn, seed: int):
    """start_fn() -> (params, momentum params or None: a copy of params)."""
    def init_fn():
        params, momentum = start_fn()
        momentum = params if momentum is None else momentum
        return initial_state(params, tx, seed + 1, extra={"momentum": jax.tree.map(jnp.array, momentum)})
    return init_fn


def _check(config) -> None:
    if config.protocol not in vqa_lib.PROTOCOLS:
        raise ValueError(f"config.protocol must be one of {sorted(vqa_lib.PROTOCOLS)}, got {config.protocol!r}")
    if not config.data.get("root"):
        raise ValueError("config.data.root (a VQA-RAD-format folder) is required")


def maps_init_from(config) -> bool:
    """init_from names a pretraining run (its tree is mapped into the VQA tree); a VQA run (e.g. a converted
    finetuned checkpoint) is loaded as it is by the loop."""
    return bool(config.get("init_from", "")) and workdir_lib.read_config(config.init_from).get("trainer") != "mumc_vqa"


def _initial_params(config, model, opening: bool):
    """-> start_fn: the pretraining run's mapped params and momentum (init_from: its tree is not the VQA
    tree), else a fresh init (momentum a copy)."""
    if maps_init_from(config) and not opening:
        start, momentum, _ = pretrained_params(config, model, config.init_from)
        return lambda: (jax.tree.map(jnp.asarray, start), jax.tree.map(jnp.asarray, momentum))
    return lambda: (fresh_params(config, model), None)


def make_task(config, workdir, *, mesh=None, opening: bool = False) -> Task:
    config = workdir_lib.with_absolute_paths(config)
    _check(config)
    mesh = mesh or parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, config.batch_size)
    tokenizer = get_tokenizer(config, workdir, use_init_from=not opening)
    train_items = vqa_lib.load_vqa(config.data.root, "train", image_dir=config.data.image_dir,
                                   val_fraction=config.data.val_fraction, seed=config.seed)
    candidates = candidate_answers(config, train_items)
    epoch_steps = max(1, len(train_items) // config.batch_size)
    length = RunLength.from_config(config, epoch_steps) if not opening else RunLength(1, epoch_steps)
    model = build_model(config, tokenizer.vocab_size)
    tx = make_optimizer(config, length.total_steps, epoch_steps)
    images = ImageCache(config.data.size)
    scores = make_evaluator(config, make_predictor(config, model, tokenizer, candidates, mesh), images)
    source = lambda: VQASource(train_items, images, tokenizer, config.data.max_question_tokens,
                               config.data.max_answer_tokens, decoded=config.data.get("augment", False))
    return Task("mumc_vqa", config, mesh, length, tx, _state_fn(tx, _initial_params(config, model, opening),
                                                               config.seed),
                make_loss_fn(config, model, epoch_steps), post_update=momentum_post_update(config),
                train_loader=lambda: iter(train_loader(source(), config)),
                evaluate=lambda state, split: scores(state.params, split), eval_split=selection_split(config),
                # (opening a finished run: its init_from folder need not exist any more)
                info={"init_from_mapped": bool(config.get("init_from", "")) if opening else maps_init_from(config),
                      "candidates": len(candidates)},
                model=model, tokenizer=tokenizer)


def train(config, workdir):
    if not config.get("best_metric", ""):
        config = ml_collections.ConfigDict(config.to_dict())
        config.best_metric = f"{selection_split(config)}/overall"
    task = make_task(config, workdir)
    # (not in task.info: run.json holds plain JSON)
    train_items = vqa_lib.load_vqa(task.config.data.root, "train", image_dir=task.config.data.image_dir,
                                   val_fraction=task.config.data.val_fraction, seed=task.config.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unanswerable = vqa_lib.count_unanswerable(train_items, candidate_answers(task.config, train_items),
                                                  "training questions")
    for w in caught:
        print(f"[mumc_vqa] warning: {w.message}", flush=True)
    _, summary = loop.fit(task, workdir)
    summary.update(unanswerable_train=unanswerable, candidates=task.info["candidates"],
                   init_from=config.get("init_from", "") or "", selection_split=task.eval_split)
    return summary


def evaluate(config, workdir, split: str = "test") -> dict:
    """Accuracy of the best checkpoint (selected on validation, or on test for protocol 'original')."""
    run = runs.open_run(workdir, config)
    result = run.task.evaluate(run.state, split)
    print(f"MUMC VQA {run.workdir.name} step {run.step}, {split} ({run.config.protocol} protocol, "
          f"{run.task.info['candidates']} candidates)")
    print(f"  {'':16s} {'accuracy':>9s} {'n':>6s}")
    rows = [("overall", "n"), ("open", "n_open"), ("closed", "n_closed")]
    rows += [(k[len(split) + 1:], f"n_{k[len(split) + 1:]}") for k in result if k.startswith(f"{split}/type/")]
    for kind, n in rows:
        print(f"  {kind:16s} {100 * result[f'{split}/{kind}']:8.1f}% {int(result[f'{split}/{n}']):6d}")
    return result

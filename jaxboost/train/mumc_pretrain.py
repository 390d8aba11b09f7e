"""MUMC pretraining (SPEC B2): MLM + ITA (cross-modal, image-image, text-text) + ITM with hard negatives.

  jaxboost train --config configs/mumc_pretrain.py:tiny --workdir runs/mumc_pt --config.data.corpus=CORPUS

Data: (a) the triplet corpus (`data.corpus`): every record is an (image, caption) pair, the caption one of
its P6/P7 prompts (SPEC C) drawn per visit; or (b) caption json files (`data.caption_files`, ROCO/MedICaT
format) with their image folders (`data.image_roots`). Images get random resized crop, flip and a light
RandAugment (jaxboost/data/caption_augment.py) on the host, from grain's per-record rng.
Tokenizer: `data.tokenizer` (a folder or vocab.txt), else the WordPiece saved in WORKDIR/tokenizer, else one
trained on the training captions and saved there (restarts and the VQA finetune reuse it).

State: params (online model + temperature), `extra = {"momentum": EMA sub-tree, "queues": image/text
queues + pointer}`, all checkpointed. One step: two masked image views (online and momentum encoders draw
independent patch masks) and the MLM masking are drawn in-graph from fold_in(rng, step), so a resumed run
repeats the same draws; after the optimizer update the temperature is clamped, the momentum model moves
towards the new params and the global batch's momentum features are written into the queues (MUMC's order:
its momentum update at the start of the next forward sees the same params). alpha ramps 0 -> 0.4 over the
first 2 epochs. Every term (mlm, ita, i2t, t2i, i2i, t2t, itm) is logged.
"""
from __future__ import annotations

import json
from pathlib import Path

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxboost import parallel, registry
from jaxboost.data import caption_augment, captions as captions_lib, pipeline
from jaxboost.data import corpus as corpus_lib
from jaxboost.data.tokenize_bert import BertTokenizer
from jaxboost.losses import contrastive
from jaxboost.models import mumc
from jaxboost.train import loop

TOKENIZER_DIR = "tokenizer"


# ------------------------------------------------------------------------------------------------ text
def corpus_captions(record) -> list[str]:
    """P6 and P7 of a record, both endings: the four captions of one (image, structure) pair."""
    prompts = record["prompts"]
    return [str(p) for p in (*prompts[6], *prompts[7])]


def training_texts(config) -> list[str]:
    """Every cleaned training caption (for training the WordPiece)."""
    d = config.data
    if d.get("corpus"):
        corpus = corpus_lib.open_corpus(d.corpus)
        texts = {captions_lib.clean_caption(c, d.max_words) for r in corpus.iter("train", arrays=False)
                 for c in corpus_captions(r)}
    else:
        items, _ = captions_lib.read_caption_sets(list(d.caption_files), list(d.image_roots), d.max_words)
        texts = {c for it in items for c in it.captions}
    return sorted(texts - {""})


def get_tokenizer(config, workdir, texts_fn=None, max_length: int | None = None) -> BertTokenizer:
    """The configured vocabulary, else WORKDIR/tokenizer, else a WordPiece trained on `texts_fn()` there."""
    d = config.data
    length = max_length or d.get("max_tokens", 25)
    source = d.get("tokenizer", "")
    folder = Path(workdir) / TOKENIZER_DIR
    if source:
        tok = (BertTokenizer.from_folder(source, length) if Path(source).is_dir()
               else BertTokenizer.from_vocab(source, length))
        if not folder.is_dir() and parallel.is_main_process():
            tok.hf.save_pretrained(str(folder))   # recorded with the run (a VQA finetune reads it from here)
        return tok
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file():
        return BertTokenizer.from_folder(str(folder), length)
    if not parallel.is_main_process():
        raise FileNotFoundError(f"{folder}: process 0 trains the tokenizer; give config.data.tokenizer on "
                                f"multi-host runs")
    texts = (texts_fn or (lambda: training_texts(config)))()
    return BertTokenizer.train(texts, str(folder), vocab_size=d.get("tokenizer_vocab_size", 2000),
                               max_length=length)


# ------------------------------------------------------------------------------------------------ data
def _example(image, caption, rng, config):
    d = config.data
    pixels = caption_augment.pretrain_augment(image, rng, d.size, crop_scale=tuple(d.crop_scale), flip=d.flip,
                                              randaugment=tuple(d.randaugment) if d.randaugment else None)
    return {"images": caption_augment.normalize(pixels), "caption": caption}


def corpus_image(record, highlight: bool) -> np.ndarray:
    """The record's image; with `highlight`, its structure tinted red as in echo-VQA's highlighted images.

    A corpus caption describes one structure (LV, MYO or LA) of an image that shows all three: on the plain
    image the three captions of an image differ by nothing the image shows, so the contrastive and matching
    terms can only learn view and phase. The tint puts the caption's subject in the pixels (the triplet's
    mask, drawn into its image)."""
    if not highlight:
        return record["image"]
    from jaxboost.data import echo_vqa
    structure = str(record["structure"])
    return echo_vqa.highlight(record["image"], np.asarray(record["mask"]) == echo_vqa.LABELS[structure])


def corpus_transform(config):
    """Record -> {images [S, S, 3] float32 normalised, caption str}; the caption one of P6/P7 (rng)."""
    max_words, highlight = config.data.max_words, config.data.get("highlight_structure", False)

    def transform(record, rng):
        options = corpus_captions(record)
        caption = captions_lib.clean_caption(options[int(rng.integers(len(options)))], max_words)
        return _example(corpus_image(record, highlight), caption,
                        rng if config.data.get("augment", True) else None, config)
    return transform


class CaptionSource:
    """grain data source over caption-json items: {image uint8 [H, W, 3], captions}."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        from PIL import Image
        item = self.items[int(index)]
        if not item.image_path.is_file():
            raise FileNotFoundError(f"caption image not found: {item.image_path}")
        with Image.open(item.image_path) as im:
            return {"image": np.asarray(im.convert("RGB")), "captions": item.captions}


class _CaptionTransform(grain.RandomMapTransform):
    def __init__(self, config):
        self.config = config

    def random_map(self, element, rng):
        caps = element["captions"]
        caption = caps[int(rng.integers(len(caps)))]
        out = _example(element["image"], caption, rng if self.config.data.get("augment", True) else None, self.config)
        return {"images": out["images"], "caption": np.asarray(caption)}


def caption_loader(items, *, global_batch_size, seed, config):
    """A grain loader over caption-json items with the same host slicing as the corpus loader."""
    source = CaptionSource(items)
    if not len(source):
        raise ValueError("the caption files hold no usable entry")
    sampler = pipeline._HostSliceSampler(
        grain.IndexSampler(num_records=len(source), shard_options=grain.NoSharding(), shuffle=True,
                           num_epochs=None, seed=seed), global_batch_size, jax.process_count(), False)
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[_CaptionTransform(config), grain.Batch(global_batch_size // jax.process_count(), True)],
        shard_options=grain.ShardOptions(jax.process_index(), jax.process_count(), drop_remainder=True))


def make_train_loader(config, split: str = "train"):
    """-> (grain loader, examples per epoch)."""
    d = config.data
    if d.get("corpus"):
        corpus = corpus_lib.open_corpus(d.corpus)
        n = corpus.split_len(split)
        # one_per_image: the corpus holds each image once per structure; with all three, a batch can hold the
        # same image under three captions (false negatives for the contrastive terms).
        keep = pipeline.sdm_filter if d.get("one_per_image", False) else None
        loader = pipeline.make_loader(d.corpus, split, global_batch_size=config.batch_size, seed=config.seed,
                                      shuffle=True, transform=corpus_transform(config), filter_fn=keep)
        return loader, n // 3 if keep else n
    if not d.get("caption_files"):
        raise ValueError("config.data.corpus or config.data.caption_files must be given")
    items, stats = captions_lib.read_caption_sets(list(d.caption_files), list(d.image_roots), d.max_words)
    print(f"[mumc_pretrain] caption files: {json.dumps(stats)}", flush=True)
    return caption_loader(items, global_batch_size=config.batch_size, seed=config.seed, config=config), len(items)


def tokenize_batch(tokenizer: BertTokenizer, max_tokens: int):
    """Host batch {images, caption} -> {images, input_ids, mask} (deterministic: no random draws here)."""
    def prepare(batch):
        ids, mask = tokenizer.tokenize([str(c) for c in np.asarray(batch["caption"]).reshape(-1)], max_tokens)
        return {"images": batch["images"], "input_ids": ids, "mask": mask}
    return prepare


# ------------------------------------------------------------------------------------------------ model
def build_model(config, vocab_size: int) -> mumc.Model:
    fields = dict(config.model)
    fields["vocab_size"] = fields.get("vocab_size") or vocab_size
    if fields["vocab_size"] < vocab_size:
        raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                         f"{vocab_size} tokens")
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = jnp.dtype(fields["dtype"])
    return registry.model_class(config.model_name)(**fields)


def steps_per_epoch(config, examples: int) -> int:
    return max(1, examples // config.batch_size)


def schedule_epoch_steps(config, examples: int) -> int:
    """Steps per epoch as the lr decay (x0.9 per epoch) and the alpha ramp (2 epochs) count them:
    `optim.epoch_steps` when set, else one pass over the data (MUMC). A phantom corpus of a few dozen
    records has 9-step epochs: counted in those, the lr reached ~0 within a few hundred steps and every term
    stalled (ITM at its prior), so the tiny config counts 50-step epochs (its 200 steps decay 4 times)."""
    steps = int(config.optim.get("epoch_steps", 0) or 0)
    if steps < 0:
        raise ValueError(f"config.optim.epoch_steps={steps}: give a positive number of steps, or 0 for one pass "
                         f"over the data")
    return steps or steps_per_epoch(config, examples)


def make_init_fn(config, model: mumc.Model, tx):
    size = config.model.image_size

    def init_fn():
        rng = jax.random.PRNGKey(config.seed)
        r_init, r_queue, r_state = jax.random.split(rng, 3)
        ids = jnp.zeros((1, 4), jnp.int32)
        params = model.init(r_init, jnp.zeros((1, size, size, 3)), ids, jnp.ones_like(ids))["params"]
        extra = {"momentum": mumc.momentum_init(params),
                 "queues": mumc.init_queues(r_queue, int(config.queue_size), model.embed_dim)}
        return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=r_state, extra=extra)
    return init_fn


def make_step_fn(config, model: mumc.Model, tx, tokenizer: BertTokenizer, epoch_steps: int):
    """MUMC step: loss and grads, update, temperature clamp, momentum EMA, enqueue the global features."""
    loss_kw = dict(mask_token_id=tokenizer.mask_id, special_token_ids=tokenizer.special_ids,
                   patch_drop=config.patch_drop, mlm_probability=config.mlm_probability)

    def step_fn(state: loop.TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        alpha = contrastive.alpha_ramp(state.step, epoch_steps, config.alpha, config.alpha_ramp_epochs)
        momentum, queues = state.extra["momentum"], state.extra["queues"]

        def loss_fn(params):
            total, terms, feats = mumc.pretrain_losses(model, params, momentum, queues, batch, rng, alpha,
                                                       **loss_kw)
            return total, (terms, feats)

        (loss, (terms, feats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = mumc.clamp_params(optax.apply_updates(state.params, updates))
        extra = {"momentum": mumc.momentum_update(params, momentum, config.momentum),
                 "queues": mumc.enqueue(queues, *feats)}
        metrics = dict(terms, loss=loss, alpha=alpha, grad_norm=optax.global_norm(grads),
                       lr_scale=opt_state.hyperparams["lr_scale"])
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics
    return step_fn


def _resolved(config, examples: int):
    """A copy with total_steps set from epochs when 0 (the `full` config)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.total_steps:
        config.total_steps = int(config.epochs) * steps_per_epoch(config, examples)
    return config


def setup(config, workdir):
    """Everything a run needs: (config, tokenizer, model, tx, loader, epoch_steps, mesh)."""
    mesh = parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, config.batch_size)
    if config.queue_size % config.batch_size:
        raise ValueError(f"queue_size={config.queue_size} must be a multiple of batch_size={config.batch_size}")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer(config, workdir)
    loader, examples = make_train_loader(config)
    config = _resolved(config, examples)
    epoch_steps = schedule_epoch_steps(config, examples)
    model = build_model(config, tokenizer.vocab_size)
    tx = loop.make_optimizer(config, config.total_steps, epoch_steps)
    return config, tokenizer, model, tx, loader, epoch_steps, mesh


def train(config, workdir):
    config, tokenizer, model, tx, loader, epoch_steps, mesh = setup(config, workdir)
    eval_fn = None
    if config.get("eval_every", 0):
        eval_fn = lambda state: evaluate_params(config, model, state.params, state.extra, tokenizer, "val", mesh)
    _, summary = loop.fit(config, workdir, init_fn=make_init_fn(config, model, tx),
                          step_fn=make_step_fn(config, model, tx, tokenizer, epoch_steps),
                          train_iter=iter(loader), eval_fn=eval_fn,
                          prepare_batch=tokenize_batch(tokenizer, config.data.max_tokens), mesh=mesh)
    summary["vocab_size"] = tokenizer.vocab_size
    return summary


# ------------------------------------------------------------------------------------------------ eval
def eval_batches(config, tokenizer, split: str, batch_size: int):
    """Un-augmented (image, first P6 caption) batches of a corpus split."""
    d = config.data
    if not d.get("corpus"):
        raise ValueError("evaluation of caption-json pretraining needs config.data.corpus (no held-out split)")
    corpus = corpus_lib.open_corpus(d.corpus)
    if not corpus.split_len(split):
        raise ValueError(f"{d.corpus}: split {split!r} is empty")
    chunk = []
    for r in corpus.iter(split):
        image = corpus_image(r, d.get("highlight_structure", False))
        chunk.append((caption_augment.normalize(caption_augment.pretrain_augment(image, None, d.size)),
                      captions_lib.clean_caption(corpus_captions(r)[0], d.max_words)))
        if len(chunk) == batch_size:
            yield _stack(chunk, tokenizer, d.max_tokens)
            chunk = []
    if chunk:
        yield _stack(chunk, tokenizer, d.max_tokens)


def _stack(chunk, tokenizer, max_tokens):
    ids, mask = tokenizer.tokenize([c for _, c in chunk], max_tokens)
    return {"images": np.stack([i for i, _ in chunk]), "input_ids": ids, "mask": mask}


def evaluate_params(config, model, params, extra, tokenizer, split: str, mesh) -> dict:
    """Mean loss terms on `split` (fixed draws, alpha at its final value, no dropout) and in-batch
    image->text / text->image retrieval accuracy (the caption of the same record ranked first)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = max(shards, (config.batch_size // shards) * shards)
    loss_kw = dict(mask_token_id=tokenizer.mask_id, special_token_ids=tokenizer.special_ids,
                   patch_drop=config.patch_drop, mlm_probability=config.mlm_probability, deterministic=True)

    def fn(p, batch):
        total, terms, _ = mumc.pretrain_losses(model, p, extra["momentum"], extra["queues"], batch,
                                               jax.random.PRNGKey(0), config.alpha, **loss_kw)
        _, image_feat = model.apply({"params": p}, batch["images"], method=mumc.Model.encode_image)
        _, text_feat = model.apply({"params": p}, batch["input_ids"], batch["mask"], method=mumc.Model.encode_text)
        sim = image_feat @ text_feat.T
        n = sim.shape[0]
        return dict(terms, loss=total, i2t_hit=jnp.argmax(sim, 1) == jnp.arange(n),
                    t2i_hit=jnp.argmax(sim, 0) == jnp.arange(n))

    sums, count, hits = {}, 0, {"i2t_hit": [], "t2i_hit": []}
    for host, out in loop.map_batches(fn, params, eval_batches(config, tokenizer, split, bs), mesh, bs):
        n = len(host["input_ids"])
        if n < bs:
            continue  # padded batch: loss terms and in-batch retrieval would count repeated rows
        for k, v in out.items():
            if k in hits:
                hits[k].append(v)
            elif np.ndim(v) == 0:
                sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
    if not count:
        raise ValueError(f"split {split!r} holds fewer than one batch ({bs}) of records")
    out = {f"{split}/{k}": v / count for k, v in sums.items()}
    out.update({f"{split}/{k[:3]}_r1": float(np.mean(np.concatenate(v))) for k, v in hits.items()})
    return out


def restore(config, workdir, prefer: str = "latest"):
    """-> (config resolved, tokenizer, model, state, step) of a pretraining workdir."""
    workdir = Path(workdir)
    if not (workdir / TOKENIZER_DIR).is_dir() and not config.data.get("tokenizer"):
        raise FileNotFoundError(f"{workdir}: no tokenizer folder; is this a MUMC pretraining workdir?")
    tokenizer = get_tokenizer(config, workdir)
    examples = 1
    if config.data.get("corpus"):
        examples = corpus_lib.open_corpus(config.data.corpus).split_len("train")
    config = _resolved(config, examples) if not config.total_steps else config
    model = build_model(config, tokenizer.vocab_size)
    tx = loop.make_optimizer(config, config.total_steps, schedule_epoch_steps(config, examples))
    abstract = jax.eval_shape(make_init_fn(config, model, tx))
    state, _, step = loop.load_params(workdir, abstract, prefer=prefer)
    return config, tokenizer, model, state, step


def load_run_config(workdir) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a training workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def evaluate(config, workdir, split: str = "test") -> dict:
    config, tokenizer, model, state, step = restore(config, workdir)
    mesh = parallel.mesh_from_config(config)
    result = evaluate_params(config, model, state.params, state.extra, tokenizer, split, mesh)
    print(f"MUMC pretraining {Path(workdir).name} step {step} on {split}: " +
          ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in sorted(result.items())), flush=True)
    return result

"""MUMC pretraining (Li et al. 2023): MLM + ITA (cross-modal, image-image, text-text) + ITM with hard negatives.

  jaxboost train --config configs/mumc_pretrain.py:tiny --workdir runs/mumc_pt --config.data.corpus=CORPUS

Data: (a) the triplet corpus (`data.corpus`): every record is an (image, caption) pair, the caption one of
its P6/P7 prompts (the corpus prompts) drawn per visit; or (b) caption json files (`data.caption_files`, ROCO/MedICaT
format) with their image folders (`data.image_roots`). Images get random resized crop, flip and a light
RandAugment (jaxboost/data/caption_augment.py) on the host, from grain's per-record rng.
Tokenizer: `data.tokenizer` (a folder or vocab.txt), else the WordPiece saved in WORKDIR/tokenizer, else one
trained on the training captions and saved there (restarts and the VQA finetune reuse it).

State: params (online model + temperature), `extra = {"momentum": EMA sub-tree, "queues": image/text
queues + pointer}`, all checkpointed. One step: two masked image views (online and momentum encoders draw
independent patch masks) and the MLM masking are drawn in-graph from fold_in(rng, step), so a resumed run
repeats the same draws. In MUMC's order the momentum features come from the stored momentum tree, the EMA step
towards this step's params follows, and the MLM teacher uses the EMA'd text encoder; teachers run with
dropout (`teacher_dropout`, MUMC's train mode). After the optimizer update the temperature is clamped, the
EMA'd tree is kept and the global batch's momentum features are written into the queues. alpha ramps
0 -> 0.4 over the first 2 epochs. Every term (mlm, ita, i2t, t2i, i2i, t2t, itm) is logged.
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
from jaxboost.losses import mumc as mumc_losses
from jaxboost.models import mumc, mumc_state, mumc_surgery
from jaxboost.train import evaluator, loop, runs, tokenizer_setup
from jaxboost.train import workdir as workdir_lib
from jaxboost.train import optim
from jaxboost.train.optim import make_optimizer
from jaxboost.train.state import initial_state
from jaxboost.train.task import RunLength, Task, compute_dtype, make_train_step

TOKENIZER_DIR = tokenizer_setup.TOKENIZER_DIR


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
    """WORKDIR/tokenizer: a copy of `data.tokenizer` (a folder or a vocab.txt), else a WordPiece built from
    `texts_fn()` (default: the training captions). Restarts and the VQA finetune read it from there."""
    d = config.data
    length = max_length or d.get("max_tokens", 25)
    source = d.get("tokenizer", "")
    bert_folder = (config.get("init", {}) or {}).get("bert", "")
    if not source and bert_folder:   # the HF folder's vocab.txt, or tokenizer/ of a `convert bert` folder
        from jaxboost.convert.bert import tokenizer_folder
        source = tokenizer_folder(bert_folder)
        if not source:
            raise FileNotFoundError(f"config.init.bert={bert_folder}: no vocab.txt / tokenizer there; set "
                                    f"config.data.tokenizer to bert-base-uncased's vocab")
    if source and Path(source).is_dir():
        build = tokenizer_setup.copier(source)
    elif source:
        build = lambda tmp: BertTokenizer.from_vocab(source, length).hf.save_pretrained(tmp)
    else:
        vocab_size = d.get("tokenizer_vocab_size", 2000)
        build = lambda tmp: BertTokenizer.train((texts_fn or (lambda: training_texts(config)))(), tmp,
                                                vocab_size=vocab_size, max_length=length)
    return BertTokenizer.from_folder(tokenizer_setup.run_tokenizer_dir(workdir, build), length)


# ------------------------------------------------------------------------------------------------ data
def _example(image, caption, rng, config):
    """The augmented view as uint8 [S, S, 3] (`pipeline.device_preprocess` normalises it in the step) or,
    with data.host_uint8=False, normalised float32 on the host."""
    return dict(augmented_view(image, rng, config), caption=caption)


def augmented_view(image, rng, config) -> dict:
    """{images}: MUMC's training view of a uint8 image (rng None: the plain resize). data.augment_at="host":
    the finished view (uint8, or normalised float32 with data.host_uint8=False); "device": the whole image
    with its crop_box and flip, which `pipeline.device_preprocess` applies in the step."""
    d = config.data
    options = dict(crop_scale=tuple(d.crop_scale), flip=d.flip,
                   randaugment=tuple(d.randaugment) if d.randaugment else None)
    if rng is not None and caption_augment.augment_at(d) == "device":
        return caption_augment.device_view_inputs(image, rng, d.size, **options)
    pixels = caption_augment.pretrain_augment(image, rng, d.size, **options)
    return {"images": pixels if pipeline.host_uint8(config) else caption_augment.normalize(pixels)}


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


def host_sliced_loader(source, *, global_batch_size: int, seed: int, operations=(), process_index=None,
                       process_count=None, worker_count: int = 0, prefetch: int = 2):
    """A grain loader over any random-access source with the corpus loader's host slicing
    (pipeline._HostSliceSampler): global batch k holds the same records on 1, 2 or 4 hosts, host p its rows
    [p*b, (p+1)*b). The process defaults to jax's."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    sampler = pipeline._HostSliceSampler(pipeline.GlobalOrder(len(source), seed=seed), global_batch_size, count,
                                         False)
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[*operations, grain.Batch(global_batch_size // count, True)],
        shard_options=grain.ShardOptions(index, count, drop_remainder=True),
        **pipeline.grain_worker_args(worker_count, prefetch))


def caption_loader(items, *, global_batch_size, seed, config):
    source = CaptionSource(items)
    if not len(source):
        raise ValueError("the caption files hold no usable entry")
    return host_sliced_loader(source, global_batch_size=global_batch_size, seed=seed,
                              operations=[_CaptionTransform(config)], **pipeline.loader_options(config))


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
                                      shuffle=True, transform=corpus_transform(config), filter_fn=keep,
                                      **pipeline.loader_options(config))
        return loader, n // 3 if keep else n
    if not d.get("caption_files"):
        raise ValueError("config.data.corpus or config.data.caption_files must be given")
    items, stats = captions_lib.read_caption_sets(list(d.caption_files), list(d.image_roots), d.max_words)
    print(f"[mumc_pretrain] caption files: {json.dumps(stats)}", flush=True)
    return caption_loader(items, global_batch_size=config.batch_size, seed=config.seed, config=config), len(items)


def tokenize_batch(tokenizer: BertTokenizer, max_tokens: int):
    """Host batch {images, caption} -> {images, input_ids, mask} (deterministic: no random draws here). Each
    distinct caption is tokenized once per run (a corpus has a few hundred), not once per step."""
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def prepare(batch):
        captions = [str(c) for c in np.asarray(batch["caption"]).reshape(-1)]
        new = sorted(set(captions) - cache.keys())
        if new:
            ids, mask = tokenizer.tokenize(new, max_tokens)
            cache.update({c: (i, m) for c, i, m in zip(new, np.asarray(ids), np.asarray(mask))})
        views = {k: batch[k] for k in ("images", "crop_box", "flip") if k in batch}   # augment_at="device"
        return {**views, "input_ids": np.stack([cache[c][0] for c in captions]),
                "mask": np.stack([cache[c][1] for c in captions])}
    return prepare


# ------------------------------------------------------------------------------------------------ model
def build_model(config, vocab_size: int) -> mumc.Model:
    fields = dict(config.model)
    fields["vocab_size"] = fields.get("vocab_size") or vocab_size
    if fields["vocab_size"] < vocab_size:
        raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                         f"{vocab_size} tokens")
    fields["dtype"] = compute_dtype(config)
    return registry.model_class(config.model_name)(**fields)


@optim.SCHEDULES.register("mumc_epoch_decay")
def mumc_epoch_decay(o, total_steps: int, steps_per_epoch: int):
    """MUMC's Pretrain.py: lr * decay ** epoch with the epoch counted from step 0 (warm-up included), the first
    `warmup_steps` replaced by a linear ramp from `warmup_lr` (1e-6) to lr."""
    del total_steps
    warmup = int(o.get("warmup_steps", 0))
    decay = optax.exponential_decay(o.lr, max(steps_per_epoch, 1), o.get("epoch_decay", 0.9), staircase=True)
    ramp = optax.linear_schedule(o.get("warmup_lr", 1e-6), o.lr, max(warmup, 1))
    return lambda step: jnp.where(step < warmup, ramp(step), decay(step))


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


def starting_point(config) -> dict | None:
    """The paper's start (MUMC models/model.py), read on the host: {"towers": text encoder from `init.bert`
    (an HF bert-base-uncased folder or its `convert bert` folder) and image encoder from `init.mae` (MAE's
    ViT file or its `convert mae` folder), "params"/"momentum"/"queues": `init.albef` (ALBEF.pth, a MUMC
    checkpoint, its `convert albef` folder or a MUMC pretraining run) loaded over both}, or None. Position
    tables at another grid are resized as MUMC's interpolate_pos_embed; the queues are taken where their shape
    matches (MUMC's load_checkpoint drops mismatched tensors; a mismatched parameter is refused, named)."""
    from jaxboost.convert import albef, bert as convert_bert, mae
    init = config.get("init", {}) or {}
    grid = config.model.image_size // config.model.patch_size
    table = config.model.get("vision_posemb") == "table"
    start, towers = {}, {}
    if init.get("bert"):
        towers["text"] = convert_bert.load_bert(init["bert"])[1]
    if init.get("mae"):
        vision, pos = mae.load_vision(init["mae"])
        if table and pos is not None:   # MUMC's build_visual_encoder: MAE's pos_embed, resized, over its own
            vision = dict(vision, pos_embedding=mumc_surgery.fit_position_table(pos, grid, init["mae"]))
        towers["vision"] = vision
    if towers:
        start["towers"] = towers
    if init.get("albef"):
        loaded = albef.load_pretrain_start(init["albef"], grid)
        if "pos_embedding" in loaded["params"]["vision"] and not table:
            raise ValueError(f"{init['albef']}: holds a learned position table; set "
                             f"config.model.vision_posemb='table' to load it")
        want = (int(config.queue_size), int(config.model.embed_dim))
        if loaded["queues"] is not None and tuple(np.shape(loaded["queues"]["image"])) != want:
            loaded["queues"] = None
        start.update(loaded)
    return start or None


def frozen_params(config) -> list[str]:
    """A stored position table is MAE's frozen pos_embed (requires_grad=False): no update, no decay."""
    return [r"^vision/pos_embedding$"] if config.model.get("vision_posemb") == "table" else []


def make_init_fn(config, model: mumc.Model, tx):
    """init_fn(start=None): the fresh state, with `starting_point(config)`'s host arrays laid over it in
    MUMC's order: towers, then the momentum copy (copy_params), then the checkpoint with its momentum
    encoders and queues."""
    size = config.model.image_size

    def init_fn(start=None):
        r_init, r_queue, r_state = jax.random.split(jax.random.PRNGKey(config.seed), 3)
        ids = jnp.zeros((1, 4), jnp.int32)
        params = model.init(r_init, jnp.zeros((1, size, size, 3)), ids, jnp.ones_like(ids))["params"]
        if "pos_embedding" in params["vision"]:   # "table": MAE's sin-cos start
            table = mumc_surgery.sincos_table(size // model.patch_size, model.vision_width)
            params = dict(params, vision=dict(params["vision"], pos_embedding=jnp.asarray(table)))
        queues = mumc_state.init_queues(r_queue, int(config.queue_size), model.embed_dim)
        start = start or {}
        if start.get("towers"):
            params, _ = mumc_surgery.overlay_params(params, start["towers"])
        momentum = mumc_state.momentum_init(params)   # MUMC's copy_params, before any checkpoint is read
        if start.get("params") is not None:
            params, _ = mumc_surgery.overlay_params(params, start["params"])
            momentum = (mumc_surgery.overlay_params(momentum, start["momentum"])[0]
                        if start.get("momentum") is not None else mumc_state.momentum_init(params))
        if start.get("queues") is not None:
            queues = jax.tree_util.tree_map(jnp.asarray, start["queues"])
        extra = {"momentum": momentum, "queues": queues}
        return initial_state(params, tx, 0, extra=extra).replace(rng=r_state)
    return init_fn


def mlm_unmaskable_ids(tokenizer: BertTokenizer) -> tuple[int, int]:
    """MUMC's `mask` spares [PAD] and [CLS] only: [SEP] can be picked (models/model.py)."""
    return (tokenizer.pad_id, tokenizer.cls_id)


def make_loss_fn(config, model: mumc.Model, tokenizer: BertTokenizer, epoch_steps: int):
    """All MUMC terms with two masked views and MLM masking drawn from the step rng; aux = the global batch's
    momentum features (for the queues)."""
    loss_kw = dict(mask_token_id=tokenizer.mask_id, special_token_ids=mlm_unmaskable_ids(tokenizer),
                   patch_drop=config.patch_drop, mlm_probability=config.mlm_probability)

    def loss_fn(params, state, batch, rng):
        batch = pipeline.device_preprocess(batch, config)  # uint8 views are normalised here, on device
        alpha = contrastive.alpha_ramp(state.step, epoch_steps, config.alpha, config.alpha_ramp_epochs)
        # MUMC's order: momentum features from the stored tree, then the EMA step towards this step's params,
        # then the MLM teacher on the EMA'd text encoder (models/model.py get_contrastive_loss, get_mlm_loss).
        momentum = state.extra["momentum"]
        momentum_next = mumc_state.momentum_update(jax.lax.stop_gradient(params), momentum, config.momentum)
        total, terms, feats = mumc_losses.pretrain_losses(
            model, params, momentum, state.extra["queues"], batch, rng, alpha, teacher_params=momentum_next,
            teacher_deterministic=not config.get("teacher_dropout", True), **loss_kw)
        return total, (dict(terms, alpha=alpha), (feats, momentum_next))
    return loss_fn


def momentum_post_update(config):
    """After the update: clamp the temperature (MUMC clamps at the start of the next forward: the same
    values), keep the step's EMA'd momentum tree, write the global batch's momentum features into the queues."""
    def post_update(old, new, aux):
        feats, momentum_next = aux
        extra = {"momentum": momentum_next, "queues": mumc_state.enqueue(old.extra["queues"], *feats)}
        return new.replace(params=mumc_state.clamp_params(new.params), extra=extra), {}
    return post_update


def make_step_fn(config, model: mumc.Model, tx, tokenizer: BertTokenizer, epoch_steps: int):
    """The MUMC train step (the loop's own step with MUMC's loss and post-update)."""
    return make_train_step(make_loss_fn(config, model, tokenizer, epoch_steps), tx, momentum_post_update(config))


def _train_examples(config) -> int:
    d = config.data
    if d.get("corpus"):
        n = corpus_lib.open_corpus(d.corpus).split_len("train")
        return n // 3 if d.get("one_per_image", False) else n
    items, _ = captions_lib.read_caption_sets(list(d.caption_files), list(d.image_roots), d.max_words)
    return len(items)


def make_task(config, workdir, *, mesh=None, opening: bool = False) -> Task:
    config = workdir_lib.with_absolute_paths(config)
    mesh = mesh or parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, config.batch_size)
    if config.queue_size % config.batch_size:
        raise ValueError(f"queue_size={config.queue_size} must be a multiple of batch_size={config.batch_size}")
    if not opening and not config.data.get("corpus") and not config.data.get("caption_files"):
        raise ValueError("config.data.corpus or config.data.caption_files must be given")
    tokenizer = get_tokenizer(config, workdir)
    examples = _train_examples(config) if (config.data.get("corpus") or not opening) else 1
    length = RunLength.from_config(config, steps_per_epoch(config, examples)) if not opening else RunLength(1)
    epoch_steps = schedule_epoch_steps(config, examples)
    model = build_model(config, tokenizer.vocab_size)
    tx = make_optimizer(config, length.total_steps, epoch_steps, frozen=frozen_params(config))
    init = dict(config.get("init", {}) or {})
    evaluate = None
    if config.data.get("corpus"):
        scores = make_evaluator(config, model, tokenizer, mesh)
        evaluate = lambda state, split: scores(state.params, state.extra, split)
    return Task("mumc_pretrain", config, mesh, length, tx, make_init_fn(config, model, tx),
                make_loss_fn(config, model, tokenizer, epoch_steps), post_update=momentum_post_update(config),
                train_loader=lambda: iter(make_train_loader(config)[0]),
                prepare_batch=tokenize_batch(tokenizer, config.data.max_tokens), evaluate=evaluate,
                info={"epoch_steps": epoch_steps, "vocab_size": tokenizer.vocab_size}, model=model,
                tokenizer=tokenizer, host_variables=None if opening or not any(init.values()) else
                (lambda: starting_point(config)))


def train(config, workdir):
    task = make_task(config, workdir)
    _, summary = loop.fit(task, workdir)
    summary["vocab_size"] = task.tokenizer.vocab_size
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


def make_evaluator(config, model, tokenizer, mesh):
    """(params, extra, split) -> mean loss terms on `split` (fixed draws, alpha at its final value, no
    dropout) and in-batch image->text / text->image retrieval accuracy (the caption of the same record ranked
    first); compiled once. Whole batches of `batch_size` only: in-batch retrieval depends on the batch."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = max(shards, (config.batch_size // shards) * shards)
    loss_kw = dict(mask_token_id=tokenizer.mask_id, special_token_ids=mlm_unmaskable_ids(tokenizer),
                   patch_drop=config.patch_drop, mlm_probability=config.mlm_probability, deterministic=True)

    def fn(variables, batch):
        p, extra = variables
        total, terms, _ = mumc_losses.pretrain_losses(model, p, extra["momentum"], extra["queues"], batch,
                                               jax.random.PRNGKey(0), config.alpha, **loss_kw)
        _, image_feat = model.apply({"params": p}, batch["images"], method=mumc.Model.encode_image)
        _, text_feat = model.apply({"params": p}, batch["input_ids"], batch["mask"], method=mumc.Model.encode_text)
        sim = image_feat @ text_feat.T
        n = sim.shape[0]
        return dict(terms, loss=total, i2t_hit=jnp.argmax(sim, 1) == jnp.arange(n),
                    t2i_hit=jnp.argmax(sim, 0) == jnp.arange(n))

    mapper = evaluator.BatchMapper(fn, mesh, bs)

    def evaluate(params, extra, split: str) -> dict:
        return _summarise(mapper((params, extra), eval_batches(config, tokenizer, split, bs)), bs, split)
    return evaluate


def _summarise(outputs, bs: int, split: str) -> dict:
    sums, count, hits = {}, 0, {"i2t_hit": [], "t2i_hit": []}
    for host, out in outputs:
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
    """-> (config, tokenizer, model, state, step) of a pretraining workdir."""
    run = runs.open_run(workdir, config, prefer=prefer)
    return run.config, run.task.tokenizer, run.task.model, run.state, run.step


def load_run_config(workdir) -> ml_collections.ConfigDict:
    return workdir_lib.read_config(workdir)


def evaluate(config, workdir, split: str = "test") -> dict:
    run = runs.open_run(workdir, config, prefer="latest")
    result = run.task.evaluate(run.state, split)
    print(f"MUMC pretraining {run.workdir.name} step {run.step} on {split}: " +
          ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in sorted(result.items())), flush=True)
    return result

"""CLIPSeg and CRIS finetuned on echo triplets (Synthetic Boost, Adhikari et al. 2023): one trainer for both.

One sample = (image, binary mask of one structure, prompt P0-P7). The step normalises the image with the
model's mean/std, runs the model (CRIS: BatchNorm statistics in `state.extra["batch_stats"]`, dropout from
the step rng) and minimises `dice_weight * Dice + bce_weight * CE` (loss.mode "fixed": BCE with logits;
"original": the public single-channel softmax CE, identically 0). AdamW with gradient clipping; the CLIP
encoders are frozen (no update, no weight decay) when model.freeze_encoders, else trained at
optim.backbone_lr_mult x lr. `num_epochs` sets the length; validation Dice (source resolution) once per
epoch drives the best checkpoint, reduce-on-plateau and early stopping (all in `loop.fit`).

Start-up is fast on CPU: parameters are initialised in numpy from `jax.eval_shape(model.init)` (the
converter's `fill_missing`: a flax init would compile every initializer, ~50 s for tiny CRIS), optionally
over converted weights (`config.pretrained`).

The tokenizer is recorded in WORKDIR/tokenizer: copied from config.data.tokenizer (a local CLIP folder),
else from the init_from run (so a finetune reads prompts as its pretraining did), else a BPE trained on
the training corpus prompts. Restarts and `evaluate` reload it.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jaxboost import metrics as metrics_lib
from jaxboost import parallel, plots, registry
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import pipeline
from jaxboost.data.labels import STRUCTURES
from jaxboost.data.tokenize_clip import ClipTokenizer
from jaxboost.losses.segmentation import dice_bce
from jaxboost.train import evaluator, loop, runs, tokenizer_setup
from jaxboost.train import workdir as workdir_lib
from jaxboost.train.optim import make_optimizer
from jaxboost.train.state import initial_state
from jaxboost.train.task import RunLength, Task, compute_dtype, keep_model_state

# Parameters of the CLIP encoders, per model (the optimiser freezes them or scales their lr).
ENCODER_PARAMS = {"clipseg": r"^(vision|text)/", "cris": r"^(visual|text)/"}
# Model fields that are training options, not architecture: a `pretrained` folder's model.json does not
# override them.
RUNTIME_FIELDS = ("freeze_encoders", "attention_impl", "pad_mode", "upsample", "dropout_rate", "remat_policy")
TOKENIZER_DIR = tokenizer_setup.TOKENIZER_DIR


# ------------------------------------------------------------------------------------------ pieces

def corpus_prompts(corpus_dir: str) -> list[str]:
    """Every prompt (P0-P7, both endings) of the training split: what a trained tokenizer must cover."""
    texts = set()
    for record in corpus_lib.open_corpus(corpus_dir).iter("train", arrays=False):
        for pair in record["prompts"]:
            texts.update(t for t in pair if t)
    return sorted(texts)


def tokenizer_for(config, workdir, use_init_from: bool = True) -> ClipTokenizer:
    """The run's tokenizer in WORKDIR/tokenizer: a copy of config.data.tokenizer (a local CLIP folder), else of
    the init_from run's (so a finetune reads prompts as its pretraining did), else a BPE trained on the
    training corpus prompts."""
    context = int(config.model.context_length)
    if config.data.get("tokenizer", ""):
        build = tokenizer_setup.copier(ClipTokenizer.from_folder(config.data.tokenizer, context).source)
    elif use_init_from and config.get("init_from", ""):
        src = Path(config.init_from) / tokenizer_setup.TOKENIZER_DIR
        if not src.is_dir():
            raise FileNotFoundError(f"config.init_from={config.init_from}: no {tokenizer_setup.TOKENIZER_DIR}/ "
                                    "folder there (is it a vl_seg run directory?)")
        build = tokenizer_setup.copier(src)
    else:
        build = lambda tmp: ClipTokenizer.train(corpus_prompts(config.data.corpus), tmp,
                                                int(config.data.get("tokenizer_vocab_size", 1000)), context)
    return ClipTokenizer.from_folder(tokenizer_setup.run_tokenizer_dir(workdir, build), context)


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def build_model(config, tokenizer: ClipTokenizer):
    """The flax module of config.model_name; vocab_size 0 = the tokenizer's size; a `pretrained` folder's
    architecture wins over config.model except for the training options (RUNTIME_FIELDS)."""
    fields = _tuples(dict(config.model))
    if config.get("pretrained", ""):
        module, _ = _converted(config.pretrained)
        arch = {k: getattr(module, k) for k in type(module).__dataclass_fields__
                if k not in ("parent", "name", "dtype") + RUNTIME_FIELDS}
        fields = {**fields, **arch}
    if not fields.get("vocab_size"):
        fields["vocab_size"] = tokenizer.vocab_size
    if fields["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens ({tokenizer.source})")
    dtype = compute_dtype(config, "dtype")
    return registry.model_class(config.model_name)(**fields, dtype=None if dtype == jnp.float32 else dtype)


def with_init_from_architecture(config):
    """A finetune builds its init_from run's model (a `jaxboost convert` run folder records the published
    sizes), keeping its own training options (RUNTIME_FIELDS)."""
    source = workdir_lib.read_config(config.init_from)
    if source.get("model_name") != config.model_name:
        raise ValueError(f"config.init_from={config.init_from}: a {source.get('model_name')!r} run, not a "
                         f"{config.model_name!r} one")
    config = ConfigDict(config.to_dict())
    config.model = {**config.model.to_dict(), **{k: v for k, v in source.model.items() if k not in RUNTIME_FIELDS}}
    return config


def _converted(path: str):
    from jaxboost.convert.clip import load_converted
    if not (Path(path) / "model.json").exists():
        raise FileNotFoundError(f"config.pretrained={path}: no model.json (expected a `jaxboost convert` folder)")
    return load_converted(path)


def _dummy_inputs(config, model):
    size = int(config.data.size)
    return (jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, model.context_length), jnp.int32),
            jnp.ones((1, model.context_length), jnp.int32))


def variable_shapes(config, model):
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                                             *_dummy_inputs(config, model)))


def host_variables(config, model) -> dict:
    """Initial variables as numpy: converted weights (config.pretrained) + numpy init of the rest."""
    from jaxboost.convert.clip import fill_missing
    shapes = variable_shapes(config, model)
    converted = {}
    if config.get("pretrained", ""):
        _, converted = _converted(config.pretrained)
    variables = fill_missing(converted, shapes, int(config.seed))
    got = {parallel._path_str(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    want = {parallel._path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    bad = sorted(k for k in got if want.get(k) != got[k])[:8]
    if bad:
        raise ValueError(f"config.pretrained={config.get('pretrained')}: tensors {bad} do not fit the model "
                         f"({[(got[k], want.get(k)) for k in bad]})")
    return variables


def encoder_groups(config) -> tuple[list[str], dict[str, float]]:
    """(frozen, lr_mults) for the CLIP encoders, from model.freeze_encoders and optim.backbone_lr_mult."""
    encoders = ENCODER_PARAMS[config.model_name]
    if config.model.get("freeze_encoders", False):
        return [encoders], {}
    mult = float(config.optim.get("backbone_lr_mult", 1.0))
    return [], ({encoders: mult} if mult != 1.0 else {})


def model_variables(state) -> dict:
    return {"params": state.params, **(state.extra or {})}


def normalise(config, images):
    """images [B, S, S, 3] in [0, 1] -> the model's input normalisation."""
    mean = jnp.asarray(config.data.mean, jnp.float32)
    std = jnp.asarray(config.data.std, jnp.float32)
    return (images - mean) / std


def _steps_per_epoch(config) -> int:
    n = corpus_lib.open_corpus(config.data.corpus).split_len("train")
    steps = n // int(config.batch_size)
    if steps == 0:
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the {n} training records of "
                         f"{config.data.corpus}")
    return steps


def _check(config) -> None:
    if config.model_name not in ENCODER_PARAMS:
        raise ValueError(f"config.model_name={config.model_name!r}: vl_seg trains {sorted(ENCODER_PARAMS)}")
    if config.loss.get("mode", "fixed") not in ("fixed", "original"):
        raise ValueError(f"config.loss.mode must be 'fixed' or 'original', got {config.loss.mode!r}")
    if not config.data.get("corpus", ""):
        raise ValueError("config.data.corpus is empty: set --config.data.corpus=CORPUS_DIR")


def make_loss_fn(config, model):
    lc = config.loss

    def loss_fn(params, state, batch, rng):
        # uint8 batches are cast, resized and flipped here, on device; float host batches pass through.
        batch = pipeline.device_preprocess(batch, config, jax.random.fold_in(rng, 1))
        variables = {"params": params, **(state.extra or {})}
        args = (normalise(config, batch["image"]), batch["input_ids"], batch["attention_mask"])
        if state.extra:   # CRIS: BatchNorm statistics, returned to post_update
            logits, updates = model.apply(variables, *args, train=True, mutable=list(state.extra),
                                          rngs={"dropout": rng})
            new_stats = dict(updates)
        else:
            logits, new_stats = model.apply(variables, *args, train=True, rngs={"dropout": rng}), None
        loss, terms = dice_bce(logits, batch["mask"], lc.dice_weight, lc.bce_weight, lc.get("mode", "fixed"))
        return loss, (terms, new_stats)
    return loss_fn


def prompt_tokens(tokenizer: ClipTokenizer, context_length: int):
    """prompts [B] -> (input_ids, attention_mask) [B, L], each distinct prompt tokenized once per run: a
    corpus has a few hundred distinct prompts, so the training thread stops re-tokenizing them every step."""
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def tokens(prompts) -> tuple[np.ndarray, np.ndarray]:
        prompts = [str(p) for p in prompts]
        new = sorted(set(prompts) - cache.keys())
        if new:
            ids, mask = tokenizer.tokenize(new, context_length)
            cache.update({p: (i, m) for p, i, m in zip(new, np.asarray(ids), np.asarray(mask))})
        return (np.stack([cache[p][0] for p in prompts]), np.stack([cache[p][1] for p in prompts]))
    return tokens


def make_task(config, workdir, *, mesh=None, opening: bool = False) -> Task:
    """Everything `train` hands to `loop.fit`; `opening`: an existing run (its own tokenizer and weights)."""
    config = workdir_lib.with_absolute_paths(config)
    _check(config)
    if not opening and config.get("init_from", ""):
        config = with_init_from_architecture(config)
    mesh = mesh or parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, int(config.batch_size))
    tokenizer = tokenizer_for(config, workdir, use_init_from=not opening)
    model = build_model(config, tokenizer)
    spe = _steps_per_epoch(config)
    length = RunLength.from_config(config, spe, per_epoch_default=True) if not opening else RunLength(1, spe)
    frozen, lr_mults = encoder_groups(config)
    tx = make_optimizer(config, length.total_steps, spe, frozen=frozen, lr_mults=lr_mults)
    abstract_variables = variable_shapes(config, model)
    seed = int(config.seed)

    def init_state(variables=None):
        # `fit` passes the numpy init + converted weights (host_variables) placed on the mesh; without them
        # (shapes for eval_shape, a run about to be restored) the state holds zeros.
        if variables is None:
            variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_variables)
        params = variables["params"]
        stats = {k: v for k, v in variables.items() if k != "params"}
        return initial_state(params, tx, seed + 1, extra=stats or None)

    tokens = prompt_tokens(tokenizer, model.context_length)

    def prepare_batch(host_batch: dict) -> dict:
        ids, mask = tokens(host_batch["prompt"])
        return {"image": host_batch["image"], "mask": host_batch["mask"], "label": host_batch["label"],
                "input_ids": ids, "attention_mask": mask}

    def train_loader():
        transform = pipeline.segmentation_transform(int(config.data.prompt), int(config.data.size),
                                                    hflip=bool(config.data.get("hflip", False)),
                                                    host_uint8=pipeline.host_uint8(config))
        return iter(pipeline.make_loader(config.data.corpus, "train", global_batch_size=int(config.batch_size),
                                         seed=seed, shuffle=True, transform=transform,
                                         **pipeline.loader_options(config)))

    scorer = SegmentationScorer(config, model, tokenizer, mesh)
    return Task(config.model_name, config, mesh, length, tx, init_state, make_loss_fn(config, model),
                post_update=keep_model_state, train_loader=train_loader, prepare_batch=prepare_batch,
                host_variables=None if opening else (lambda: host_variables(config, model)),
                evaluate=lambda state, split: scorer(model_variables(state), split, hausdorff=False),
                model=model, tokenizer=tokenizer)


def train(config, workdir) -> dict:
    task = make_task(config, workdir)
    _, summary = loop.fit(task, workdir)
    summary["steps_per_epoch"] = task.length.steps_per_epoch
    return summary


# ------------------------------------------------------------------------------------------ evaluation

def _ground_truth(record) -> np.ndarray:
    """The record's structure as a binary mask at the source resolution (corpus size when not kept)."""
    orig = np.asarray(record.get("orig_mask", np.zeros((0, 0))))
    labels = orig if orig.size else np.asarray(record["mask"])
    return labels == int(record["label"])


def eval_prompts(config) -> list[int]:
    prompts = [int(p) for p in (config.data.get("eval_prompts", ()) or ())] or [int(config.data.prompt)]
    for p in prompts:
        if not 0 <= p < 8:
            raise ValueError(f"config.data.eval_prompts: prompt index {p} is not in 0..7")
    return prompts


class SegmentationScorer:
    """(variables, split) -> {split}/dice_{S}, iou_{S}, dice_mean, iou_mean (and hd_{S}, hd_mean) for the
    first prompt, and {split}/P{k}/... for every prompt when several are scored; x100 (Dice, IoU), pixels (HD).
    Every (image, structure) record is scored at the source resolution, batch by batch; compiled once."""

    def __init__(self, config, model, tokenizer, mesh):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        fn = lambda v, b: model.apply(v, normalise(config, b["image"]), b["input_ids"], b["attention_mask"])
        # trim_last: the demo's 24 validation records run as 24 rows, not 32; CLIPSeg's and CRIS's logits at
        # batch 24 equal their rows at batch 32 bit for bit (checked on the demo configs).
        self.mapper = evaluator.BatchMapper(fn, mesh, evaluator.eval_batch_size(config, mesh), trim_last=True)

    def _batches(self, records, prompt: int):
        transform = pipeline.segmentation_transform(prompt, int(self.config.data.size))
        examples = ((r, transform(r, np.random.default_rng(i))) for i, r in enumerate(records))
        while chunk := list(itertools.islice(examples, self.mapper.batch_size)):
            ids, mask = self.tokenizer.tokenize([e["prompt"] for _, e in chunk], self.model.context_length)
            yield {"image": np.stack([e["image"] for _, e in chunk]), "input_ids": ids, "attention_mask": mask,
                   "record": [r for r, _ in chunk]}

    def _score_prompt(self, variables, records, prompt: int, hausdorff: bool, keep: set[int]):
        scores, kept, threshold, i = {s: [] for s in STRUCTURES}, {}, float(self.config.threshold), 0
        for host_batch, logits in self.mapper(variables, self._batches(records, prompt)):
            for record, record_logits in zip(host_batch["record"], logits):
                row = metrics_lib.score_mask(record_logits, _ground_truth(record), threshold,
                                             name=str(record.get("key", i)), with_hausdorff=hausdorff)
                if hausdorff:
                    row["hd"] = row.pop("hausdorff")
                scores[record["structure"]].append(row)
                if i in keep:
                    kept[i] = (record, record_logits)
                i += 1
        return scores, kept

    def __call__(self, variables, split: str, *, prompts=None, hausdorff=True, overlay_path=None,
                 n_overlays: int = 6) -> dict:
        config = self.config
        corpus_dir = config.data.get("eval_corpus", "") or config.data.corpus
        corpus = corpus_lib.open_corpus(corpus_dir)
        n = corpus.split_len(split)
        if not n:
            raise ValueError(f"{corpus_dir}: split {split!r} is empty")
        prompts = prompts or eval_prompts(config)
        keep = set(np.linspace(0, n - 1, min(n_overlays, n)).astype(int).tolist()) if overlay_path else set()
        out = {}
        for pi, p in enumerate(prompts):
            scores, kept = self._score_prompt(variables, corpus.iter(split), p, hausdorff,
                                              keep if pi == 0 else set())
            prefixes = [f"{split}/"] if len(prompts) == 1 else ([f"{split}/P{p}/"] + ([f"{split}/"] if pi == 0 else []))
            for prefix in prefixes:
                out.update(_summarise(scores, prefix))
            if pi == 0 and overlay_path:
                _draw_overlays(overlay_path, kept, float(config.threshold), p)
        return out


def _summarise(scores: dict, prefix: str) -> dict:
    out = {}
    for metric in ("dice", "iou", "hd"):
        per = {s: [r[metric] for r in rows if metric in r] for s, rows in scores.items()}
        per = {s: v for s, v in per.items() if v}
        if not per:
            continue
        for s, v in per.items():
            out[f"{prefix}{metric}_{s}"] = float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")
            out[f"{prefix}{metric}_std_{s}"] = float(np.nanstd(v)) if not np.all(np.isnan(v)) else float("nan")
        means = [out[f"{prefix}{metric}_{s}"] for s in per]
        out[f"{prefix}{metric}_mean"] = float(np.nanmean(means)) if not np.all(np.isnan(means)) else float("nan")
    return out


def _draw_overlays(path, kept: dict, threshold, prompt):
    """Rows of (image, ground truth, prediction) for the kept records (index -> (record, logits)), the
    structure in its palette colour."""
    rows, titles = [], []
    for i in sorted(kept):
        r, logits = kept[i]
        image, label = np.asarray(r["image"]), int(r["label"])
        gt = np.where(np.asarray(r["mask"]) == label, label, 0)
        pred = np.where(metrics_lib.probabilities_at(logits, image.shape) > threshold, label, 0)
        rows.append([image, plots.overlay(image, gt, alpha=0.5), plots.overlay(image, pred, alpha=0.5)])
        titles.append([f"image ({r['structure']}, P{prompt})", "ground truth", "prediction"])
    plots.image_grid(path, rows, titles, title=f"{Path(path).stem}: threshold {threshold:g}")


def format_table(result: dict, split: str, prompts: list[int]) -> str:
    """Paper-style table: per prompt and structure, mean ± std of Dice, IoU (x100) and Hausdorff (px)."""
    lines = [f"{'prompt':<7}{'structure':<10}{'Dice':>16}{'IoU':>16}{'Hausdorff px':>18}", "-" * 67]
    for p in prompts:
        prefix = f"{split}/" if len(prompts) == 1 else f"{split}/P{p}/"
        for s in (*STRUCTURES, "mean"):
            cells = []
            for metric in ("dice", "iou", "hd"):
                if s == "mean":
                    v = result.get(f"{prefix}{metric}_mean")
                    cells.append("" if v is None else f"{v:.2f}")
                else:
                    v, sd = result.get(f"{prefix}{metric}_{s}"), result.get(f"{prefix}{metric}_std_{s}")
                    cells.append("" if v is None else f"{v:.2f} ± {sd:.2f}")
            lines.append(f"{'P' + str(p):<7}{s:<10}{cells[0]:>16}{cells[1]:>16}{cells[2]:>18}")
    return "\n".join(lines)


def evaluate(config, workdir, split: str = "test") -> dict:
    """Best checkpoint of WORKDIR on `split`: prints the table, writes WORKDIR/overlays_<split>.png and
    returns {split}/dice_mean, {split}/dice_LV, ... (x100)."""
    run = runs.open_run(workdir, config)
    task = run.task
    if not (run.workdir / TOKENIZER_DIR).is_dir():
        raise FileNotFoundError(f"{run.workdir}/{TOKENIZER_DIR} not found: is {run.workdir} a trained vl_seg run?")
    prompts = eval_prompts(task.config)
    scorer = SegmentationScorer(task.config, task.model, task.tokenizer, task.mesh)
    result = scorer(model_variables(run.state), split, prompts=prompts,
                    overlay_path=str(run.workdir / f"overlays_{split}.png"),
                    n_overlays=int(task.config.get("overlays", 6)))
    print(f"{task.config.model_name} {run.workdir.name} (step {run.step}) on {split}, source resolution, mean ± std "
          f"over masks:\n" + format_table(result, split, prompts))
    return result

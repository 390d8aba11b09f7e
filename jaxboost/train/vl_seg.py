"""Vision-language segmenters (CLIPSeg, CRIS) finetuned on echo triplets (SPEC A4): one trainer for both.

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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxboost import metrics as metrics_lib
from jaxboost import parallel, registry
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import pipeline
from jaxboost.data.labels import STRUCTURES
from jaxboost.data.tokenize_clip import ClipTokenizer
from jaxboost.losses.segmentation import dice_bce
from jaxboost.train import loop

# Parameters of the CLIP encoders, per model (the optimiser freezes them or scales their lr).
ENCODER_PARAMS = {"clipseg": r"^(vision|text)/", "cris": r"^(visual|text)/"}
# Model fields that are training options, not architecture: a `pretrained` folder's model.json does not
# override them.
RUNTIME_FIELDS = ("freeze_encoders", "attention_impl", "pad_mode", "upsample", "dropout_rate")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOKENIZER_DIR = "tokenizer"


# ------------------------------------------------------------------------------------------ pieces

def corpus_prompts(corpus_dir: str) -> list[str]:
    """Every prompt (P0-P7, both endings) of the training split: what a trained tokenizer must cover."""
    texts = set()
    for record in corpus_lib.open_corpus(corpus_dir).iter("train", arrays=False):
        for pair in record["prompts"]:
            texts.update(t for t in pair if t)
    return sorted(texts)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Atomic copy (several hosts may do this at once; the first rename wins)."""
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=dst.parent))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    try:
        os.replace(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_for(config, workdir) -> ClipTokenizer:
    """The run's tokenizer, recorded in WORKDIR/tokenizer (see the module docstring for the order)."""
    workdir = Path(workdir).absolute()
    folder = workdir / TOKENIZER_DIR
    context = int(config.model.context_length)
    if not (folder / "tokenizer.json").exists() and not (folder / "vocab.json").exists():
        workdir.mkdir(parents=True, exist_ok=True)
        if config.data.get("tokenizer", ""):
            _copy_tokenizer(Path(ClipTokenizer.from_folder(config.data.tokenizer, context).source), folder)
        elif config.get("init_from", ""):
            src = Path(config.init_from) / TOKENIZER_DIR
            if not src.is_dir():
                raise FileNotFoundError(f"config.init_from={config.init_from}: no {TOKENIZER_DIR}/ folder there "
                                        "(is it a vl_seg run directory?)")
            _copy_tokenizer(src, folder)
        else:
            if not config.data.corpus:
                raise ValueError("config.data.corpus is empty: set --config.data.corpus=CORPUS_DIR")
            tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=workdir))
            ClipTokenizer.train(corpus_prompts(config.data.corpus), str(tmp),
                                int(config.data.get("tokenizer_vocab_size", 1000)), context)
            try:
                os.replace(tmp, folder)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
    return ClipTokenizer.from_folder(str(folder), context)


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
    dtype = config.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return registry.model_class(config.model_name)(**fields, dtype=DTYPES[dtype] if dtype != "float32" else None)


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


def optimizer_config(config) -> ml_collections.ConfigDict:
    """config with optim.frozen / optim.lr_mults completed from model.freeze_encoders and backbone_lr_mult."""
    config = ml_collections.ConfigDict(config.to_dict())
    encoders = ENCODER_PARAMS[config.model_name]
    frozen = list(config.optim.get("frozen", ()) or ())
    mults = dict(config.optim.get("lr_mults", {}) or {})
    if config.model.get("freeze_encoders", False) and encoders not in frozen:
        frozen.append(encoders)
    elif float(config.optim.get("backbone_lr_mult", 1.0)) != 1.0:
        mults[encoders] = float(config.optim.backbone_lr_mult)
    config.optim.frozen = tuple(frozen)
    config.optim.lr_mults = mults
    return config


def build_state(variables, tx, seed: int) -> loop.TrainState:
    params = variables["params"]
    stats = {k: v for k, v in variables.items() if k != "params"}
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(seed + 1), extra=stats or None)


def model_variables(state: loop.TrainState) -> dict:
    return {"params": state.params, **(state.extra or {})}


def normalise(config, images):
    """images [B, S, S, 3] in [0, 1] -> the model's input normalisation."""
    mean = jnp.asarray(config.data.mean, jnp.float32)
    std = jnp.asarray(config.data.std, jnp.float32)
    return (images - mean) / std


class Task(NamedTuple):
    config: Any               # resolved: total_steps, eval_every, ckpt_every, optim.frozen/lr_mults
    model: Any
    tokenizer: ClipTokenizer
    tx: Any
    init_fn: Any
    abstract_variables: Any
    loss_fn: Any
    step_fn: Any
    prepare_batch: Any
    steps_per_epoch: int


def setup(config, workdir, *, host_init: bool = True) -> Task:
    """Everything `train` hands to `loop.fit` (tests use it to run steps on chosen meshes)."""
    if config.model_name not in ENCODER_PARAMS:
        raise ValueError(f"config.model_name={config.model_name!r}: vl_seg trains {sorted(ENCODER_PARAMS)}")
    if config.loss.get("mode", "fixed") not in ("fixed", "original"):
        raise ValueError(f"config.loss.mode must be 'fixed' or 'original', got {config.loss.mode!r}")
    config = optimizer_config(config)
    tokenizer = tokenizer_for(config, workdir)
    model = build_model(config, tokenizer)
    steps_per_epoch = 1
    if config.data.get("corpus", ""):
        n = corpus_lib.open_corpus(config.data.corpus).split_len("train")
        steps_per_epoch = n // int(config.batch_size)
        if steps_per_epoch == 0:
            raise ValueError(f"config.batch_size={config.batch_size} is larger than the {n} training records of "
                             f"{config.data.corpus}")
    config.steps_per_epoch = steps_per_epoch
    config.total_steps = int(config.get("total_steps", 0) or int(config.num_epochs) * steps_per_epoch)
    config.eval_every = config.get("eval_every", 0) or steps_per_epoch
    config.ckpt_every = config.get("ckpt_every", 0) or steps_per_epoch
    tx = loop.make_optimizer(config, config.total_steps, steps_per_epoch)
    abstract_variables = variable_shapes(config, model)
    seed = int(config.seed)

    def init_fn():
        variables = jax.tree.map(jnp.asarray, host_variables(config, model)) if host_init else abstract_variables
        return build_state(variables, tx, seed)

    lc = config.loss

    def loss_fn(params, state, batch, rng):
        variables = {"params": params, **(state.extra or {})}
        args = (normalise(config, batch["image"]), batch["input_ids"], batch["attention_mask"])
        if state.extra:
            logits, updates = model.apply(variables, *args, train=True, mutable=list(state.extra),
                                          rngs={"dropout": rng})
            new_extra = dict(updates)
        else:
            logits, new_extra = model.apply(variables, *args, train=True, rngs={"dropout": rng}), None
        loss, terms = dice_bce(logits, batch["mask"], lc.dice_weight, lc.bce_weight, lc.get("mode", "fixed"))
        return loss, (terms, new_extra)

    def prepare_batch(host_batch: dict) -> dict:
        ids, mask = tokenizer.tokenize([str(p) for p in host_batch["prompt"]], model.context_length)
        return {"image": host_batch["image"], "mask": host_batch["mask"], "input_ids": ids, "attention_mask": mask}

    return Task(config, model, tokenizer, tx, init_fn, abstract_variables, loss_fn,
                loop.make_step_fn(loss_fn, tx), prepare_batch, steps_per_epoch)


# ------------------------------------------------------------------------------------------ train

def train(config, workdir) -> dict:
    if not config.data.get("corpus", ""):
        raise ValueError("config.data.corpus is empty: set --config.data.corpus=CORPUS_DIR")
    mesh = parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, int(config.batch_size))
    task = setup(config, workdir)
    cfg = task.config
    loader = pipeline.make_loader(cfg.data.corpus, "train", global_batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                                  shuffle=True, transform=pipeline.segmentation_transform(int(cfg.data.prompt),
                                                                                          int(cfg.data.size)))

    def eval_fn(state):
        return evaluate_params(cfg, task.model, task.tokenizer, model_variables(state), "val", mesh,
                               hausdorff=False)

    _, summary = loop.fit(cfg, workdir, init_fn=task.init_fn, step_fn=task.step_fn, train_iter=iter(loader),
                          eval_fn=eval_fn, prepare_batch=task.prepare_batch, mesh=mesh)
    summary["steps_per_epoch"] = task.steps_per_epoch
    return summary


# ------------------------------------------------------------------------------------------ evaluation

def _eval_batch(config, mesh) -> int:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(shards, (int(config.get("eval_batch_size", config.batch_size)) // shards) * shards)


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


def evaluate_params(config, model, tokenizer, variables, split: str, mesh, *, prompts=None, hausdorff=True,
                    overlay_path: str | None = None, n_overlays: int = 6) -> dict:
    """Scores every (image, structure) record of `split` at the source resolution.

    Returns {split}/dice_{S}, iou_{S}, dice_mean, iou_mean (and hd_{S}, hd_mean) for the first prompt, and
    {split}/P{k}/... for every prompt when several are scored. Values are x100 (Dice, IoU) and pixels (HD).
    """
    corpus_dir = config.data.get("eval_corpus", "") or config.data.corpus
    records = list(corpus_lib.open_corpus(corpus_dir).iter(split))
    if not records:
        raise ValueError(f"{corpus_dir}: split {split!r} is empty")
    size, bs = int(config.data.size), _eval_batch(config, mesh)
    prompts = prompts or eval_prompts(config)
    fn = lambda v, b: model.apply(v, normalise(config, b["image"]), b["input_ids"], b["attention_mask"])
    out = {}
    for pi, p in enumerate(prompts):
        transform = pipeline.segmentation_transform(p, size)
        examples = (transform(r, np.random.default_rng(i)) for i, r in enumerate(records))

        def batches():
            while chunk := list(itertools.islice(examples, bs)):
                ids, mask = tokenizer.tokenize([e["prompt"] for e in chunk], model.context_length)
                yield {"image": np.stack([e["image"] for e in chunk]), "input_ids": ids, "attention_mask": mask}

        scores = {s: [] for s in STRUCTURES}
        logits_all = []
        for _, logits in loop.map_batches(fn, variables, batches(), mesh, bs):
            logits_all.append(logits)
        logits_all = np.concatenate(logits_all)
        for record, logits in zip(records, logits_all):
            gt = _ground_truth(record)
            pred = metrics_lib.probabilities_at(logits, gt.shape) > float(config.threshold)
            dice, iou = metrics_lib.dice_iou(pred, gt)
            row = {"dice": dice, "iou": iou}
            if hausdorff:
                row["hd"] = metrics_lib.hausdorff(pred, gt)
            scores[record["structure"]].append(row)
        prefixes = [f"{split}/"] if len(prompts) == 1 else ([f"{split}/P{p}/"] + ([f"{split}/"] if pi == 0 else []))
        for prefix in prefixes:
            out.update(_summarise(scores, prefix))
        if pi == 0 and overlay_path:
            _draw_overlays(overlay_path, records, logits_all, float(config.threshold), n_overlays, p)
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


def _draw_overlays(path, records, logits, threshold, n, prompt):
    """Rows of (image, ground truth, prediction) for `n` records spread over the split."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    idx = np.linspace(0, len(records) - 1, min(n, len(records))).astype(int)
    fig, axes = plt.subplots(len(idx), 3, figsize=(7.5, 2.5 * len(idx)), squeeze=False)
    for row, i in zip(axes, idx):
        r = records[i]
        image = np.asarray(r["image"], np.float32)
        gt = np.asarray(r["mask"]) == int(r["label"])
        pred = metrics_lib.probabilities_at(logits[i], image.shape) > threshold
        for ax, (title, m) in zip(row, (("image", None), ("ground truth", gt), ("prediction", pred))):
            ax.imshow(image, cmap="gray")
            if m is not None:
                ax.imshow(np.ma.masked_where(~m, m), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(f"{title}" + (f" ({r['structure']}, P{prompt})" if m is None else ""), fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    workdir = Path(workdir).absolute()
    if not (workdir / TOKENIZER_DIR).is_dir():
        raise FileNotFoundError(f"{workdir}/{TOKENIZER_DIR} not found: is {workdir} a trained vl_seg run?")
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = ""  # the tokenizer and weights are the run's own
    mesh = parallel.mesh_from_config(config)
    task = setup(config, workdir, host_init=False)
    abstract = jax.eval_shape(lambda v: build_state(v, task.tx, 0), task.abstract_variables)
    state, _, step = loop.load_params(workdir, abstract, prefer="best")
    prompts = eval_prompts(config)
    result = evaluate_params(task.config, task.model, task.tokenizer, model_variables(state), split, mesh,
                             prompts=prompts, overlay_path=str(workdir / f"overlays_{split}.png"),
                             n_overlays=int(config.get("overlays", 6)))
    print(f"{config.model_name} {workdir.name} (step {step}) on {split}, source resolution, mean ± std over "
          f"masks:\n" + format_table(result, split, prompts))
    return result

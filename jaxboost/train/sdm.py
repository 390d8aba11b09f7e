"""SDM training (Wang et al. 2022): MSE + lambda * VLB (improved-diffusion), label dropout for guidance, EMA params.

  jaxboost train --config configs/sdm.py:tiny --workdir runs/sdm --config.data.corpus=CORPUS

Each corpus image is used once (sdm_transform keeps one record per image): image in [-1, 1] and its 5-label
SDM map (CAMUS labels + the scan cone). Every `eval_every` steps the EMA params sample the first validation
masks with the config's sampler; process 0 writes workdir/samples/step_XXXXXX.png (mask | real | sample) and
the validation diffusion loss (EMA params, fixed noise) goes to the metrics. The run's config.json (written
by the loop) is all `jaxboost synth` needs to rebuild the model, schedule and sampler.
"""
from __future__ import annotations

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxboost import parallel, plots, registry
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import pipeline
from jaxboost.diffusion import losses as diffusion_losses
from jaxboost.diffusion import samplers, schedules
from jaxboost.train import checkpoints as ckpt_lib
from jaxboost.train import evaluator, loop, runs
from jaxboost.train import workdir as workdir_lib
from jaxboost.train.optim import make_optimizer
from jaxboost.train.state import ema_update, initial_state
from jaxboost.train.task import RunLength, Task

log = logging.getLogger(__name__)

GRID_ROWS = 8  # validation masks shown in the sample grid


def build_model(config):
    return registry.model_class(config.model_name)(**config.model)


def make_schedule(config) -> schedules.Schedule:
    return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)


def apply_fn_for(model, train: bool = False, dropout_rng=None):
    """apply_fn(params, x [B,H,W,C], t [B] int32, one-hot labels [B,H,W,L]) -> [B,H,W,2C]."""
    def apply_fn(params, x, t, labels):
        rngs = {"dropout": dropout_rng} if train else None
        return model.apply({"params": params}, x, t, labels, train=train, rngs=rngs)
    return apply_fn


def init_params(model, config, rng):
    size, c = config.model.image_size, config.model.in_channels
    return model.init(rng, jnp.zeros((1, size, size, c)), jnp.zeros((1,), jnp.int32),
                      jnp.zeros((1, size, size, config.model.num_labels)))["params"]


def make_init_fn(model, config, tx):
    def init_fn():
        # The EMA starts as a copy of the initial params (as improved-diffusion).
        return initial_state(init_params(model, config, jax.random.PRNGKey(config.seed)), tx, config.seed + 1,
                             ema=True)
    return init_fn


def abstract_state(config):
    """The TrainState tree of an SDM run (shapes only): what synth and evaluate restore into."""
    return jax.eval_shape(make_init_fn(build_model(config), config, make_optimizer(config, 1)))


def guidance_of(config) -> float | None:
    """The sampler's guidance scale (None: conditional only); warns for a model trained without dropout."""
    guidance = config.sampler.get("guidance", None)
    warn_unguided_training(config, guidance)
    return guidance


def warn_unguided_training(config, guidance) -> None:
    if guidance is not None and float(config.diffusion.get("cond_drop_prob", 0.0)) == 0.0:
        msg = (f"guidance {guidance} requested but this SDM was trained without label dropout "
               "(diffusion.cond_drop_prob=0): its unconditional branch is untrained and guidance will "
               "degrade samples; use guidance None/1.0")
        log.warning(msg)
        print(f"[jaxboost] warning: {msg}", flush=True)


def one_hot_labels(labels, num_labels: int):
    """[B, H, W] int label maps -> [B, H, W, L] float32 one-hot (the model's conditioning input)."""
    return jax.nn.one_hot(labels, num_labels, dtype=jnp.float32)


def make_loss_fn(model, config, schedule):
    num_labels = config.model.num_labels
    vlb_weight = float(config.diffusion.vlb_weight)
    drop = float(config.diffusion.get("cond_drop_prob", 0.0))

    def loss_fn(params, state, batch, rng):
        batch = pipeline.device_preprocess(batch, config)  # uint8 host batches -> [-1, 1] images, SDM labels
        dropout_rng, loss_rng = jax.random.split(rng)
        apply_fn = apply_fn_for(model, train=True, dropout_rng=dropout_rng)
        loss, metrics = diffusion_losses.diffusion_loss(
            apply_fn, params, schedule, batch["image"], one_hot_labels(batch["labels"], num_labels), loss_rng,
            vlb_weight=vlb_weight, cond_drop_prob=drop)
        return loss, ({"mse": metrics["mse"], "vb": metrics["vb"]}, None)

    return loss_fn


def ema_post_update(ema_decay: float):
    """post_update: an EMA whose decay warms up as min(decay, (1 + step) / (10 + step)): a short CPU run's EMA
    is then not mostly the random initialisation (long runs see `ema_decay` after ~10/(1-d) steps)."""
    def post_update(old, new, aux):
        step = old.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        return new.replace(ema_params=ema_update(old.ema_params, new.params, decay)), {"ema_decay": decay}
    return post_update


# ------------------------------------------------------------------------------------------ sample grid

def fixed_val_batch(config, n: int, split: str = "val") -> dict:
    """The first n images of `split` (one record per image): image [n,S,S,C] in [-1,1], labels [n,S,S]."""
    corpus = corpus_lib.open_corpus(config.data.corpus)
    if corpus.split_len(split) == 0:
        split = "train"
    transform = pipeline.sdm_transform(config.data.size, channels=config.model.in_channels)
    records = itertools.islice((r for r in corpus.iter(split) if pipeline.sdm_filter(r)), n)
    examples = [transform(r, None) for r in records]
    if not examples:
        raise ValueError(f"{config.data.corpus}: no images in split {split!r} for the sample grid")
    while len(examples) < n:  # a tiny corpus: repeat
        examples += examples[: n - len(examples)]
    return {k: np.stack([e[k] for e in examples]) for k in ("image", "labels")}


def to_host(array: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array -> numpy on every host."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def images_to_uint8(images) -> np.ndarray:
    """[..., C] float in [-1, 1] -> [...] uint8 (channel mean: grayscale echo)."""
    gray = np.asarray(images, np.float32).mean(-1)
    return np.clip(np.round((gray + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_sample_grid(path, step: int, labels: np.ndarray, real: np.ndarray, samples: np.ndarray) -> None:
    """One row per validation mask: SDM label map | real image | sample (uint8 arrays)."""
    rows = [[plots.label_colours(lab, plots.SDM_PALETTE), img, smp] for lab, img, smp in zip(labels, real, samples)]
    titles = [["mask", "real", "sample"]] + [["", "", ""]] * (len(rows) - 1)
    plots.image_grid(path, rows, titles, title=f"SDM samples at step {step} (fixed masks and noise)")


# ------------------------------------------------------------------------------------------ task

def make_sample_grid(config, model, schedule, mesh, workdir):
    """params, step -> writes workdir/samples/step_XXXXXX.png for fixed validation masks and noise (process 0),
    so the grids are comparable from step to step."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    val = fixed_val_batch(config, -(-GRID_ROWS // shards) * shards)
    keys = np.asarray(jax.random.key_data(samplers.per_sample_keys(config.seed, 0, len(val["labels"]))))
    fixed = parallel.shard_global_batch(mesh, {"labels": val["labels"].astype(np.int32), "keys": keys})
    dtype = config.sampler.get("dtype", "float32")
    run_sampler = samplers.make_sampler(
        apply_fn_for(model), schedule, channels=config.model.in_channels, sampler=config.sampler.name,
        steps=config.sampler.steps, eta=config.sampler.eta, guidance=guidance_of(config),
        dtype=None if dtype == "float32" else jnp.dtype(dtype))
    num_labels = config.model.num_labels

    def write(params, step: int) -> None:
        samples = to_host(run_sampler(params, one_hot_labels(fixed["labels"], num_labels), fixed["keys"]))
        if parallel.is_main_process():
            write_sample_grid(workdir / "samples" / f"step_{step:06d}.png", step, val["labels"][:GRID_ROWS],
                              images_to_uint8(val["image"][:GRID_ROWS]), images_to_uint8(samples[:GRID_ROWS]))
    return write


def make_loss_evaluator(config, model, schedule, mesh):
    """(params, split) -> {split}/loss, mse, vb: the diffusion loss per image with fixed noise, streamed."""
    num_labels, vlb = config.model.num_labels, float(config.diffusion.vlb_weight)

    def per_sample(params, batch):
        def one(image, labels, key):
            _, m = diffusion_losses.diffusion_loss(apply_fn_for(model), params, schedule, image[None],
                                                   one_hot_labels(labels[None], num_labels), key, vlb_weight=vlb)
            return m
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), i))(batch["index"])
        return jax.vmap(one)(batch["image"], batch["labels"], keys)

    mapper = evaluator.BatchMapper(per_sample, mesh, evaluator.eval_batch_size(config, mesh))
    transform = pipeline.sdm_transform(config.data.size, channels=config.model.in_channels)

    def evaluate(params, split: str) -> dict:
        corpus = corpus_lib.open_corpus(config.data.corpus)
        records = (transform(r, None) for r in corpus.iter(split) if pipeline.sdm_filter(r))

        def batches():
            start = 0
            while chunk := list(itertools.islice(records, mapper.batch_size)):
                yield {"image": np.stack([c["image"] for c in chunk]), "labels": np.stack([c["labels"] for c in chunk]),
                       "index": np.arange(start, start + len(chunk), dtype=np.int32)}  # fixed noise per image
                start += len(chunk)

        totals = {"loss": [], "mse": [], "vb": []}
        for _, out in mapper(params, batches()):
            for k in totals:
                totals[k].append(out[k])
        if not totals["loss"]:
            raise ValueError(f"{config.data.corpus}: split {split!r} holds no images")
        return {f"{split}/{k}": float(np.mean(np.concatenate(v))) for k, v in totals.items()}
    return evaluate


def make_task(config, workdir, *, mesh=None, opening: bool = False) -> Task:
    config = workdir_lib.with_absolute_paths(config)
    mesh = mesh or parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, config.batch_size)
    if not config.data.corpus:
        raise ValueError("config.data.corpus is empty: pass --config.data.corpus=CORPUS (a corpus folder)")
    size, channels = config.model.image_size, config.model.in_channels
    if config.data.size != size:
        raise ValueError(f"config.data.size={config.data.size} but config.model.image_size={size}")
    if not opening:
        corpus_size = corpus_lib.open_corpus(config.data.corpus).size
        if corpus_size != size:
            # Training resizes the images on the fly, but `jaxboost synth` conditions on masks at the model's
            # size: say so now rather than after training.
            log.warning("%s is a %d px corpus but the SDM trains at %d px (config.model.image_size): images and "
                        "masks are resized for training, and `jaxboost synth` will need a %d px masks corpus",
                        config.data.corpus, corpus_size, size, size)
    model, schedule = build_model(config), make_schedule(config)
    length = RunLength.from_config(config) if not opening else RunLength(max(int(config.total_steps), 1))
    tx = make_optimizer(config, length.total_steps)
    losses = make_loss_evaluator(config, model, schedule, mesh)
    grid = None if opening else make_sample_grid(config, model, schedule, mesh, workdir_lib.resolve(workdir))

    def evaluate(state, split):
        if grid is not None and split == "val":
            grid(state.ema_params, int(jax.device_get(state.step)))
        return losses(state.ema_params, split)

    uint8 = pipeline.host_uint8(config)
    fields = ("image", "mask", "cone") if uint8 else ("image", "labels")

    def train_loader():
        transform = pipeline.sdm_transform(size, channels=channels, host_uint8=uint8)
        return iter(pipeline.make_loader(config.data.corpus, "train", global_batch_size=config.batch_size,
                                         seed=config.seed, shuffle=True, transform=transform,
                                         **pipeline.loader_options(config)))

    return Task("sdm", config, mesh, length, tx, make_init_fn(model, config, tx), make_loss_fn(model, config, schedule),
                post_update=ema_post_update(float(config.ema_decay)), train_loader=train_loader,
                prepare_batch=lambda b: {k: b[k] for k in fields}, evaluate=evaluate, model=model)


def train(config, workdir):
    return loop.fit(make_task(config, workdir), workdir)[1]


def load_run(workdir, mesh=None):
    """(config, EMA params on `mesh`, step) of an SDM training run folder: only the EMA params are read, each
    leaf FSDP-split over the mesh's `fsdp` axis (replicated when fsdp = 1), as the sampler uses them."""
    workdir = workdir_lib.resolve(workdir)
    config = runs.read_run_config(workdir, expect="sdm")
    mesh = mesh or parallel.mesh_from_config(config)
    abstract = abstract_state(config)
    ema, step = ckpt_lib.load_ema_params(workdir, abstract, parallel.shardings_for(abstract.ema_params, mesh))
    return config, ema, int(step)


def evaluate(config, workdir, split: str = "val") -> dict:
    """Diffusion loss (EMA params) over a split of the run's corpus."""
    run = runs.open_run(workdir, config, prefer="latest", expect="sdm")
    result = run.task.evaluate(run.state, split)
    print(f"SDM {run.workdir.name} step {run.step} on {split}: " +
          ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in result.items()))
    return result

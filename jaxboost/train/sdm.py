"""Semantic diffusion model training (SPEC A3): MSE + lambda * VLB, label dropout for guidance, EMA params.

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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxboost import parallel, registry
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import pipeline
from jaxboost.diffusion import losses as diffusion_losses
from jaxboost.diffusion import samplers, schedules
from jaxboost.train import loop

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
        params = init_params(model, config, jax.random.PRNGKey(config.seed))
        # The EMA starts as a copy of the initial params (as improved-diffusion).
        return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(config.seed + 1),
                               ema_params=jax.tree.map(jnp.copy, params))
    return init_fn


def abstract_state(config):
    """The TrainState tree of an SDM run (shapes only): what synth and evaluate restore into."""
    model = build_model(config)
    tx = loop.make_optimizer(config, config.total_steps)
    return jax.eval_shape(make_init_fn(model, config, tx))


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
        dropout_rng, loss_rng = jax.random.split(rng)
        apply_fn = apply_fn_for(model, train=True, dropout_rng=dropout_rng)
        loss, metrics = diffusion_losses.diffusion_loss(
            apply_fn, params, schedule, batch["image"], one_hot_labels(batch["labels"], num_labels), loss_rng,
            vlb_weight=vlb_weight, cond_drop_prob=drop)
        return loss, ({"mse": metrics["mse"], "vb": metrics["vb"]}, None)

    return loss_fn


def make_step_fn(loss_fn, tx, ema_decay: float):
    """The loop's step plus an EMA whose decay warms up as min(decay, (1 + step) / (10 + step)): a short
    CPU run's EMA is then not mostly the random initialisation (long runs see `ema_decay` after ~10/(1-d))."""
    base = loop.make_step_fn(loss_fn, tx, ema_decay=None)

    def step_fn(state, batch):
        new, metrics = base(state, batch)
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        return new.replace(ema_params=loop.ema_update(state.ema_params, new.params, decay)), \
            dict(metrics, ema_decay=decay)

    return step_fn


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


def global_array(mesh, host_array: np.ndarray) -> jax.Array:
    """An array every host holds whole -> a global array split over the mesh's batch axes."""
    sharding = parallel.batch_sharding(mesh, host_array.ndim)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def to_host(array: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array -> numpy on every host."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def images_to_uint8(images) -> np.ndarray:
    """[..., C] float in [-1, 1] -> [...] uint8 (channel mean: grayscale echo)."""
    gray = np.asarray(images, np.float32).mean(-1)
    return np.clip(np.round((gray + 1.0) * 127.5), 0, 255).astype(np.uint8)


def replicated_value(array: jax.Array) -> np.ndarray:
    """A replicated (possibly multi-host) array -> numpy, from this host's first copy."""
    return np.asarray(array.addressable_data(0))


_LABEL_COLOURS = np.array([[0, 0, 0], [220, 60, 60], [90, 90, 90], [60, 200, 90], [70, 120, 240]], np.uint8)


def label_colours(labels: np.ndarray) -> np.ndarray:
    """SDM label map [H, W] -> [H, W, 3] uint8 (outside cone black, tissue grey, LV red, MYO green, LA blue)."""
    return _LABEL_COLOURS[np.clip(labels, 0, len(_LABEL_COLOURS) - 1)]


def write_grid(path: Path, labels: np.ndarray, real: np.ndarray, samples: np.ndarray) -> None:
    """One row per mask: mask | real image | sample, as one PNG (uint8 arrays, no matplotlib)."""
    from PIL import Image
    rows = []
    for lab, img, smp in zip(labels, real, samples):
        gray = lambda a: np.repeat(a[..., None], 3, -1)
        pad = np.full((lab.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([label_colours(lab), pad, gray(img), pad, gray(smp)], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    scale = max(1, 256 // labels.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ training

def train(config, workdir):
    mesh = parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, config.batch_size)
    if not config.data.corpus:
        raise ValueError("config.data.corpus is empty: pass --config.data.corpus=CORPUS (a corpus folder)")
    model = build_model(config)
    schedule = make_schedule(config)
    size, channels, num_labels = config.model.image_size, config.model.in_channels, config.model.num_labels
    if config.data.size != size:
        raise ValueError(f"config.data.size={config.data.size} but config.model.image_size={size}")
    transform = pipeline.sdm_transform(size, channels=channels)
    loader = pipeline.make_loader(config.data.corpus, "train", global_batch_size=config.batch_size,
                                  seed=config.seed, shuffle=True, transform=transform)
    tx = loop.make_optimizer(config, config.total_steps)
    guidance = guidance_of(config)

    # Fixed validation masks and noise: the grid and the val loss are comparable from step to step.
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-GRID_ROWS // shards) * shards
    val = fixed_val_batch(config, rows)
    val_labels = global_array(mesh, val["labels"].astype(np.int32))
    val_images = global_array(mesh, val["image"].astype(np.float32))
    keys = jax.random.key_data(samplers.per_sample_keys(config.seed, 0, rows))
    val_keys = global_array(mesh, np.asarray(keys))
    run_sampler = samplers.make_sampler(
        apply_fn_for(model), schedule, channels=channels, sampler=config.sampler.name,
        steps=config.sampler.steps, eta=config.sampler.eta, guidance=guidance,
        dtype=None if config.sampler.get("dtype", "float32") == "float32" else jnp.dtype(config.sampler.dtype))

    @jax.jit
    def val_loss(params, images, labels):
        loss, metrics = diffusion_losses.diffusion_loss(
            apply_fn_for(model), params, schedule, images, one_hot_labels(labels, num_labels),
            jax.random.PRNGKey(config.seed + 2), vlb_weight=float(config.diffusion.vlb_weight))
        return metrics

    def eval_fn(state):
        step = int(jax.device_get(state.step))
        params = state.ema_params
        metrics = {k: replicated_value(v) for k, v in val_loss(params, val_images, val_labels).items()}
        samples = to_host(run_sampler(params, one_hot_labels(val_labels, num_labels), val_keys))
        if parallel.is_main_process():
            write_grid(Path(workdir) / "samples" / f"step_{step:06d}.png", val["labels"][:GRID_ROWS],
                       images_to_uint8(val["image"][:GRID_ROWS]), images_to_uint8(samples[:GRID_ROWS]))
        return {"val/loss": float(metrics["loss"]), "val/mse": float(metrics["mse"]), "val/vb": float(metrics["vb"])}

    _, summary = loop.fit(config, workdir, init_fn=make_init_fn(model, config, tx),
                          step_fn=make_step_fn(make_loss_fn(model, config, schedule), tx, float(config.ema_decay)),
                          train_iter=iter(loader), eval_fn=eval_fn, mesh=mesh,
                          prepare_batch=lambda b: {"image": b["image"], "labels": b["labels"]})
    return summary


# ------------------------------------------------------------------------------------------ evaluation

def load_run(workdir, mesh=None):
    """(config, EMA params on `mesh`, step) of an SDM training run folder: only the EMA params are read, each
    leaf FSDP-split over the mesh's `fsdp` axis (replicated when fsdp = 1), as the sampler uses them."""
    import json

    import ml_collections
    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found; {workdir} is not a jaxboost training run")
    config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    if config.get("trainer") != "sdm" or config.get("model_name") != "sdm":
        raise ValueError(f"{workdir}: a {config.get('trainer')!r} run ({config.get('model_name')!r} model), "
                         "not an SDM run (config.json trainer must be 'sdm')")
    mesh = mesh or parallel.mesh_from_config(config)
    abstract = abstract_state(config)
    ema, step = restore_ema_params(workdir, abstract, parallel.shardings_for(abstract.ema_params, mesh))
    return config, ema, step


def restore_ema_params(workdir, abstract_state, shardings):
    """The `ema_params` subtree alone of a run's newest readable checkpoint (ckpt/, then best/), each leaf
    restored straight into its sharding (a tree like abstract_state.ema_params): sampling never holds the
    params and Adam moments (3/4 of a TrainState) nor a replicated copy. A checkpoint of another config is
    refused by name (loop's structure check). Returns (ema params, step)."""
    import orbax.checkpoint as ocp
    workdir = Path(workdir).absolute()
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          abstract_state.ema_params, shardings)
    args = ocp.args.PyTreeRestore(item={"ema_params": target}, partial_restore=True,
                                  restore_args={"ema_params": ocp.checkpoint_utils.construct_restore_args(target)})
    for sub in ("ckpt", "best"):
        if not (workdir / sub).is_dir():
            continue
        manager = ocp.CheckpointManager(workdir / sub, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
        for step in sorted(manager.all_steps(), reverse=True):
            loop._check_same_structure(abstract_state, manager, step, workdir / sub)
            try:
                restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]["ema_params"]
            except Exception as e:  # noqa: BLE001 - an unreadable step: fall back to the previous one
                log.error("checkpoint %s/%s/%s: EMA params unreadable (%s: %s); trying the previous one",
                          workdir, sub, step, type(e).__name__, str(e)[:300])
                continue
            return restored, step
    raise FileNotFoundError(f"no readable checkpoint with EMA params under {workdir}/ckpt or {workdir}/best")


def evaluate(config, workdir, split: str = "val") -> dict:
    """Diffusion loss (EMA params) over a split of the run's corpus."""
    mesh = parallel.mesh_from_config(config)
    _, params, step = load_run(workdir, mesh)
    model, schedule = build_model(config), make_schedule(config)
    num_labels = config.model.num_labels
    transform = pipeline.sdm_transform(config.data.size, channels=config.model.in_channels)
    corpus = corpus_lib.open_corpus(config.data.corpus)
    records = (transform(r, None) for r in corpus.iter(split) if pipeline.sdm_filter(r))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = max(shards, (config.batch_size // shards) * shards)

    def batches():
        start = 0
        while chunk := list(itertools.islice(records, bs)):
            yield {"image": np.stack([c["image"] for c in chunk]), "labels": np.stack([c["labels"] for c in chunk]),
                   "index": np.arange(start, start + len(chunk), dtype=np.int32)}  # fixed noise per image
            start += len(chunk)

    def per_sample(params, batch):
        def one(image, labels, key):
            _, m = diffusion_losses.diffusion_loss(
                apply_fn_for(model), params, schedule, image[None], one_hot_labels(labels[None], num_labels), key,
                vlb_weight=float(config.diffusion.vlb_weight))
            return m
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), i))(batch["index"])
        return jax.vmap(one)(batch["image"], batch["labels"], keys)

    totals = {"loss": [], "mse": [], "vb": []}
    for _, out in loop.map_batches(per_sample, params, batches(), mesh, bs):
        for k in totals:
            totals[k].append(out[k])
    result = {f"{split}/{k}": float(np.mean(np.concatenate(v))) for k, v in totals.items() if v}
    print(f"SDM {Path(workdir).name} step {step} on {split}: " +
          ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in result.items()))
    return result

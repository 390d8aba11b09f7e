"""Multi-class U-Net segmentation on the triplet corpus (one sample per image, labels 0-3).

The foundation's proof of the trainer, and the judge of SDM samples (label fidelity: Dice of this model on
synthetic images against the masks that conditioned them).
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxboost import metrics as metrics_lib
from jaxboost import parallel, registry
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import pipeline
from jaxboost.data.labels import STRUCTURES
from jaxboost.train import loop


def image_transform(record, rng=None, *, size: int):
    """Record -> {image [S,S,1] float in [0,1], labels [S,S] int32}; the corpus is already at `size`."""
    image = np.asarray(record["image"], np.float32)
    if image.shape != (size, size):
        raise ValueError(f"record {record.get('key')}: image is {image.shape}, config.data.size is {size}")
    return {"image": image[..., None] / 255.0, "labels": np.asarray(record["mask"], np.int32)}


one_per_image = pipeline.sdm_filter  # the corpus holds each image once per structure


def build_model(config):
    return registry.model_class(config.model_name)(**config.model)


def train(config, workdir):
    mesh = parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, config.batch_size)
    model = build_model(config)
    size = config.data.size
    loader = pipeline.make_loader(config.data.corpus, "train", global_batch_size=config.batch_size,
                                  seed=config.seed, shuffle=True,
                                  transform=functools.partial(image_transform, size=size), filter_fn=one_per_image)
    train_iter = iter(loader)
    tx = loop.make_optimizer(config, config.total_steps)

    def init_fn():
        params = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 1)))["params"]
        return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(config.seed + 1))

    def loss_fn(params, state, batch, rng):
        logits = model.apply({"params": params}, batch["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return ce, ({"ce": ce}, None)

    def eval_fn(state):
        return evaluate_params(config, model, state.params, "val", mesh)

    _, summary = loop.fit(config, workdir, init_fn=init_fn, step_fn=loop.make_step_fn(loss_fn, tx),
                          train_iter=train_iter, eval_fn=eval_fn, mesh=mesh)
    return summary


def predict_labels(config, model, params, images: np.ndarray, mesh=None) -> np.ndarray:
    """images [N, S, S] uint8 -> predicted label maps [N, S, S] (used for SDM label fidelity)."""
    mesh = mesh or parallel.mesh_from_config(config)
    bs = _eval_batch(config, mesh)
    batches = ({"image": images[i:i + bs, ..., None].astype(np.float32) / 255.0} for i in range(0, len(images), bs))
    fn = lambda p, b: jnp.argmax(model.apply({"params": p}, b["image"]), -1)
    return np.concatenate([out for _, out in loop.map_batches(fn, params, batches, mesh, bs)])


def _eval_batch(config, mesh):
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(shards, (config.get("eval_batch_size", config.batch_size) // shards) * shards)


def evaluate_params(config, model, params, split: str, mesh) -> dict:
    corpus = corpus_lib.open_corpus(config.data.corpus)
    records = (r for r in corpus.iter(split) if one_per_image(r))
    size = config.data.size
    bs = _eval_batch(config, mesh)

    def batches():
        while chunk := list(itertools.islice(records, bs)):
            yield {"image": np.stack([image_transform(r, size=size)["image"] for r in chunk]),
                   "labels": np.stack([r["mask"] for r in chunk])}

    fn = lambda p, b: jnp.argmax(model.apply({"params": p}, b["image"]), -1)
    per_structure = {s: [] for s in STRUCTURES}
    for host_batch, pred in loop.map_batches(fn, params, batches(), mesh, bs):
        for label, s in enumerate(STRUCTURES, start=1):
            per_structure[s] += [metrics_lib.dice_iou(p == label, g == label)[0]
                                 for p, g in zip(pred, host_batch["labels"])]
    out = {f"{split}/dice_{s}": float(np.mean(v)) for s, v in per_structure.items() if v}
    out[f"{split}/dice_mean"] = float(np.mean([out[f"{split}/dice_{s}"] for s in per_structure if per_structure[s]]))
    return out


def restore(config, workdir, prefer: str = "best"):
    """-> (model, params, step) of a U-Net workdir (the best checkpoint by default)."""
    model = build_model(config)
    size = config.data.size
    tx = loop.make_optimizer(config, config.total_steps)

    def state():
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)))["params"]
        return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(0))
    restored, _, step = loop.load_params(workdir, jax.eval_shape(state), prefer=prefer)
    return model, restored.params, step


def evaluate(config, workdir, split: str = "test") -> dict:
    mesh = parallel.mesh_from_config(config)
    model, params, step = restore(config, workdir)
    result = evaluate_params(config, model, params, split, mesh)
    print(f"U-Net {Path(workdir).name} step {step} on {split}: " +
          ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in result.items()))
    return result

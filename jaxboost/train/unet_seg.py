"""Multi-class U-Net segmentation on the triplet corpus (one sample per image, labels 0-3).

The foundation's proof of the trainer, and the judge of SDM samples (label fidelity: Dice of this model on
synthetic images against the masks that conditioned them).
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxboost import metrics as metrics_lib
from jaxboost import parallel, registry
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import pipeline
from jaxboost.data.labels import STRUCTURES
from jaxboost.train import evaluator, loop, runs
from jaxboost.train import workdir as workdir_lib
from jaxboost.train.optim import make_optimizer
from jaxboost.train.state import initial_state
from jaxboost.train.task import RunLength, Task


def image_transform(record, rng=None, *, size: int, host_uint8: bool = False):
    """Record -> {image [S,S,1] float in [0,1], labels [S,S] int32}; the corpus is already at `size`.
    host_uint8: image and labels uint8 [S,S] as stored (`pipeline.device_preprocess` casts them in the step)."""
    image = np.asarray(record["image"])
    if image.shape != (size, size):
        raise ValueError(f"record {record.get('key')}: image is {image.shape}, config.data.size is {size}")
    if host_uint8:
        return {"image": image, "labels": np.asarray(record["mask"])}
    return {"image": image.astype(np.float32)[..., None] / 255.0, "labels": np.asarray(record["mask"], np.int32)}


one_per_image = pipeline.sdm_filter  # the corpus holds each image once per structure


def build_model(config):
    return registry.model_class(config.model_name)(**config.model)


def label_predictor(model):
    return lambda p, b: jnp.argmax(model.apply({"params": p}, b["image"]), -1)


def predict_labels(config, model, params, images: np.ndarray, mesh=None) -> np.ndarray:
    """images [N, S, S] uint8 -> predicted label maps [N, S, S] (used for SDM label fidelity)."""
    mesh = mesh or parallel.mesh_from_config(config)
    bs = evaluator.eval_batch_size(config, mesh)
    batches = ({"image": images[i:i + bs, ..., None].astype(np.float32) / 255.0} for i in range(0, len(images), bs))
    mapper = evaluator.BatchMapper(label_predictor(model), mesh, bs)
    return np.concatenate([out for _, out in mapper(params, batches)])


def make_evaluator(config, model, mesh):
    """split -> params -> {split}/dice_{S}, dice_mean (x100); compiled once."""
    mapper = evaluator.BatchMapper(label_predictor(model), mesh, evaluator.eval_batch_size(config, mesh))
    size = config.data.size

    def evaluate(params, split: str) -> dict:
        records = (r for r in corpus_lib.open_corpus(config.data.corpus).iter(split) if one_per_image(r))

        def batches():
            while chunk := list(itertools.islice(records, mapper.batch_size)):
                yield {"image": np.stack([image_transform(r, size=size)["image"] for r in chunk]),
                       "labels": np.stack([r["mask"] for r in chunk])}

        per_structure = {s: [] for s in STRUCTURES}
        for host_batch, pred in mapper(params, batches()):
            for label, s in enumerate(STRUCTURES, start=1):
                per_structure[s] += [metrics_lib.dice_iou(p == label, g == label)[0]
                                     for p, g in zip(pred, host_batch["labels"])]
        out = {f"{split}/dice_{s}": float(np.mean(v)) for s, v in per_structure.items() if v}
        out[f"{split}/dice_mean"] = float(np.mean([out[f"{split}/dice_{s}"] for s in per_structure
                                                   if per_structure[s]]))
        return out
    return evaluate


def evaluate_params(config, model, params, split: str, mesh) -> dict:
    """One split's scores (compiles its evaluator; a run's own evaluation reuses the task's)."""
    return make_evaluator(config, model, mesh)(params, split)


def make_task(config, workdir, *, mesh=None, opening: bool = False) -> Task:
    config = workdir_lib.with_absolute_paths(config)
    mesh = mesh or parallel.mesh_from_config(config)
    parallel.check_batch_divides(mesh, config.batch_size)
    model, size = build_model(config), config.data.size
    length = RunLength.from_config(config)
    tx = make_optimizer(config, length.total_steps)

    def init_state():
        params = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 1)))["params"]
        return initial_state(params, tx, config.seed + 1)

    def loss_fn(params, state, batch, rng):
        batch = pipeline.device_preprocess(batch, config)  # uint8 host batches are cast here, on device
        logits = model.apply({"params": params}, batch["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return ce, ({"ce": ce}, None)

    def train_loader():
        return iter(pipeline.make_loader(config.data.corpus, "train", global_batch_size=config.batch_size,
                                         seed=config.seed, shuffle=True, filter_fn=one_per_image,
                                         transform=functools.partial(image_transform, size=size,
                                                                     host_uint8=pipeline.host_uint8(config)),
                                         **pipeline.loader_options(config)))

    scores = make_evaluator(config, model, mesh)
    return Task("unet_seg", config, mesh, length, tx, init_state, loss_fn, train_loader=train_loader,
                evaluate=lambda state, split: scores(state.params, split), model=model)


def train(config, workdir):
    return loop.fit(make_task(config, workdir), workdir)[1]


def restore(config, workdir, prefer: str = "best"):
    """-> (model, params, step) of a U-Net workdir (the best checkpoint by default)."""
    run = runs.open_run(workdir, config, prefer=prefer)
    return run.task.model, run.state.params, run.step


def evaluate(config, workdir, split: str = "test") -> dict:
    run = runs.open_run(workdir, config)
    result = run.task.evaluate(run.state, split)
    print(f"U-Net {run.workdir.name} step {run.step} on {split}: " +
          ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in result.items()))
    return result

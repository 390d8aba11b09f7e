"""A linear-regression task on the real loop (grain loader, orbax, jit step), run in a subprocess by the
resilience tests:  python tests/toy_task.py WORKDIR TOTAL_STEPS [key=value ...]."""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain.python as grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxboost import parallel  # noqa: E402
from jaxboost.train import loop, optim, state as state_lib, task as task_lib  # noqa: E402


def make_config(total_steps: int, **kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        name="toy", total_steps=total_steps, batch_size=8, seed=0, log_every=1, eval_every=0, ckpt_every=5,
        keep_checkpoints=3, async_checkpointing=True, best_metric="", mesh=dict(data=-1, fsdp=1),
        optim=dict(name="adamw", lr=0.05, weight_decay=0.01, grad_clip=1.0, schedule="cosine", warmup_steps=3),
        nan_at=-1, sleep=0.0, eval_values=[], plateau_patience=0, early_stop_patience=0, width=4))
    c.update_from_flattened_dict({k: type(c[k])(v) if not isinstance(c[k], list) else eval(v) for k, v in kw.items()})
    return c


class ToySource(grain.RandomAccessDataSource):
    def __init__(self, n=64, width=4, nan_at=-1):
        rng = np.random.default_rng(123)
        self.x = rng.normal(size=(n, width)).astype(np.float32)
        self.y = (self.x @ np.arange(1, width + 1, dtype=np.float32) + 0.5).astype(np.float32)
        if nan_at >= 0:
            self.x[nan_at] = np.nan

    def __len__(self):
        return len(self.x)

    def __repr__(self):  # grain checks the data source's repr on restore
        return f"ToySource(n={len(self.x)})"

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def run(workdir: str, config) -> state_lib.TrainState:
    loader = grain.DataLoader(
        data_source=ToySource(width=config.width, nan_at=config.nan_at),
        sampler=grain.IndexSampler(64, grain.NoSharding(), shuffle=True, num_epochs=None, seed=config.seed),
        operations=[grain.Batch(config.batch_size, drop_remainder=True)], worker_count=0)
    tx = optim.make_optimizer(config, config.total_steps)

    def init_fn():
        params = {"w": jnp.zeros((config.width,)), "b": jnp.zeros(())}
        return state_lib.initial_state(params, tx, config.seed)

    def loss_fn(params, state, batch, rng):
        noise = 0.01 * jax.random.normal(rng, batch["y"].shape)  # uses the step rng: resume must restore it
        loss = jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"] + noise) ** 2)
        return loss, ({}, None)

    values = list(config.eval_values)
    eval_fn = (lambda state, split: {"val/score": values.pop(0) if values else 0.0}) if values else None

    def prepare(b):
        if config.sleep:
            time.sleep(config.sleep)
        return b

    task = task_lib.Task(name="toy", config=config, mesh=parallel.mesh_from_config(config),
                         length=task_lib.RunLength.from_config(config), tx=tx, init_state=init_fn, loss_fn=loss_fn,
                         train_loader=lambda: iter(loader), prepare_batch=prepare, evaluate=eval_fn)
    state, summary = loop.fit(task, workdir)
    return state, summary


if __name__ == "__main__":
    workdir, total = sys.argv[1], int(sys.argv[2])
    kw = dict(a.split("=", 1) for a in sys.argv[3:])
    state, _ = run(workdir, make_config(total, **kw))
    np.save(os.path.join(workdir, "final_params.npy"),
            np.concatenate([np.asarray(state.params["w"]), np.asarray(state.params["b"])[None]]))

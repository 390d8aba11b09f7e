"""The one training loop every task uses: state, optimiser, sharded jit step, checkpoints, metrics.

A task file (`train/<task>.py`) builds three things and hands them to `fit`:
  - `init_fn() -> TrainState` (pure; `fit` traces it with `jax.eval_shape` and creates it sharded),
  - `loss_fn(params, state, batch, rng) -> (loss, (metrics, new_extra))`, or a whole custom `step_fn`,
  - a checkpointable host iterator of numpy batches and an optional `eval_fn(state) -> {name: float}`.
Everything else — mesh, `donate_argnums`, orbax (latest-N + best, async, data-iterator position, fallback
to the previous good step), TensorBoard + JSONL metrics, progress bar, NaN stop, SIGTERM save, plateau LR,
early stopping, pretrain->finetune initialisation — lives here once.
"""
from __future__ import annotations

import json
import logging
import math
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from jaxboost import parallel
from jaxboost.registry import Registry

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None   # SDM keeps an EMA copy for sampling
    extra: Any = None        # task state that is not optimised: MUMC momentum encoders and queues


# ------------------------------------------------------------------------------------------ optimiser

SCHEDULES = Registry("lr schedule")


@SCHEDULES.register("constant")
def _constant(o: ConfigDict, total_steps: int, steps_per_epoch: int):
    warmup = int(o.get("warmup_steps", 0))
    if not warmup:
        return optax.constant_schedule(o.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup])


@SCHEDULES.register("cosine")
def _cosine(o: ConfigDict, total_steps: int, steps_per_epoch: int):
    return optax.warmup_cosine_decay_schedule(0.0 if o.get("warmup_steps", 0) else o.lr, o.lr,
                                              int(o.get("warmup_steps", 0)), max(total_steps, 1), 0.0)


@SCHEDULES.register("linear_to_zero")
def _linear_to_zero(o: ConfigDict, total_steps: int, steps_per_epoch: int):
    """guided-diffusion's lr_anneal_steps: lr * (1 - step / total_steps)."""
    return optax.linear_schedule(o.lr, 0.0, max(total_steps, 1))


@SCHEDULES.register("warmup_epoch_decay")
def _warmup_epoch_decay(o: ConfigDict, total_steps: int, steps_per_epoch: int):
    """ALBEF/MUMC: linear warm-up, then lr * decay ** epoch."""
    warmup = int(o.get("warmup_steps", 0))
    decay = optax.exponential_decay(o.lr, max(steps_per_epoch, 1), o.get("epoch_decay", 0.9), staircase=True)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(o.get("warmup_lr", 1e-5), o.lr, warmup), decay], [warmup])


def _param_labels(params, frozen: list[str], lr_mults: dict[str, float]):
    def label(path, _):
        name = parallel._path_str(path)
        if any(re.search(rx, name) for rx in frozen):
            return "frozen"
        for i, rx in enumerate(lr_mults):
            if re.search(rx, name):
                return f"mult{i}"
        return "base"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ConfigDict, total_steps: int, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """AdamW/Adam/SGD with a named schedule, global-norm clipping, frozen parameter groups (regexes in
    `optim.frozen` get no update and no weight decay) and per-group lr multipliers (`optim.lr_mults`, e.g.
    the CRIS backbone at 0.1x). `lr_scale` is an injected hyper-parameter the loop lowers on plateau."""
    o = config.optim
    schedule = SCHEDULES.get(o.get("schedule", "constant"))(o, total_steps, steps_per_epoch)
    frozen = list(o.get("frozen", []) or [])
    lr_mults = dict(o.get("lr_mults", {}) or {})

    def base(mult: float):
        sched = (lambda s: schedule(s) * mult) if mult != 1.0 else schedule
        name = o.get("name", "adamw")
        if name == "adamw":
            return optax.adamw(sched, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8),
                               weight_decay=o.get("weight_decay", 0.0))
        if name == "adam":
            return optax.adam(sched, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8))
        if name == "sgd":
            return optax.sgd(sched, momentum=o.get("momentum", 0.9))
        raise ValueError(f"config.optim.name={name!r}: use adamw, adam or sgd")

    def build(lr_scale):
        transforms = {"base": base(1.0), "frozen": optax.set_to_zero()}
        transforms.update({f"mult{i}": base(float(m)) for i, m in enumerate(lr_mults.values())})
        inner = optax.multi_transform(transforms, lambda p: _param_labels(p, frozen, lr_mults))
        chain = [inner, optax.scale(lr_scale)]
        if o.get("grad_clip", 0.0):
            chain.insert(0, optax.clip_by_global_norm(o.grad_clip))
        return optax.chain(*chain)

    return optax.inject_hyperparams(build)(lr_scale=1.0)


def set_lr_scale(state: TrainState, scale: float) -> TrainState:
    hp = dict(state.opt_state.hyperparams)
    old = hp["lr_scale"]
    hp["lr_scale"] = jax.device_put(jnp.asarray(scale, old.dtype), old.sharding)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))


def ema_update(ema, params, decay: float):
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, ema, params)


# ------------------------------------------------------------------------------------------ train step

def make_step_fn(loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: float | None = None):
    """Standard step: grads of `loss_fn`, optax update, optional EMA of params, `extra` from the loss."""

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay is not None and ema is not None:
            ema = ema_update(ema, params, ema_decay)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       lr_scale=opt_state.hyperparams["lr_scale"])
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                             extra=new_extra if new_extra is not None else state.extra), metrics

    return step_fn


# ------------------------------------------------------------------------------------------ metrics

class MetricWriter:
    """TensorBoard event files + one JSON line per write; only process 0 writes."""

    def __init__(self, workdir: str | Path):
        self.enabled = parallel.is_main_process()
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")

    def close(self):
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    p = Path(workdir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


# ------------------------------------------------------------------------------------------ checkpoints

def _tree_paths(tree) -> set[str]:
    return {parallel._path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpoints:
    """orbax managers for the latest N steps and the best-by-metric step, with the data iterator's
    position and a small JSON of loop state (early stopping, plateau, best) saved beside the arrays."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True, best_metric: str | None = None,
                 best_mode: str = "max", data_iter=None):
        self.workdir = Path(workdir).absolute()
        self.has_data = data_iter is not None and hasattr(data_iter, "get_state")
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        if self.has_data:
            import grain.python as grain
            handlers["data"] = grain.PyGrainCheckpointHandler()
        self.latest = ocp.CheckpointManager(
            self.workdir / "ckpt", item_handlers=handlers,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save))
        self.best = None
        if best_metric:
            self.best = ocp.CheckpointManager(
                self.workdir / "best", item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                      "meta": ocp.JsonCheckpointHandler()},
                options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[best_metric],
                                                     best_mode=best_mode, enable_async_checkpointing=False))

    def save(self, step: int, state: TrainState, meta: dict, data_iter=None, force: bool = False) -> None:
        import grain.python as grain
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if self.has_data and data_iter is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iter)
        self.latest.save(step, args=ocp.args.Composite(**items), force=force)

    def save_best(self, step: int, state: TrainState, meta: dict, metrics: dict) -> None:
        if self.best is not None:
            self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), metrics=metrics)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        if self.best is not None:
            self.best.close()


class CheckpointMismatchError(ValueError):
    """The checkpoint is readable but holds another model/config's tree."""


def _check_same_structure(abstract_state, manager: ocp.CheckpointManager, step: int, where: Path) -> None:
    meta = manager.item_metadata(step)
    stored = meta["state"] if meta is not None and "state" in meta else None
    if stored is None:
        return
    flat = lambda t: {parallel._path_str(p): getattr(l, "shape", None)
                      for p, l in jax.tree_util.tree_flatten_with_path(t)[0]}
    want, have = flat(abstract_state), flat(stored)
    missing, unexpected = sorted(set(want) - set(have))[:8], sorted(set(have) - set(want))[:8]
    reshaped = [f"{k}: checkpoint {tuple(have[k])} vs config {tuple(want[k])}" for k in sorted(set(want) & set(have))
                if want[k] is not None and have[k] is not None and tuple(want[k]) != tuple(have[k])][:8]
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(
            f"checkpoint {where}/{step} was written by a different config: missing keys {missing}, "
            f"unexpected keys {unexpected}, different shapes {reshaped}")


def restore_state(manager: ocp.CheckpointManager, abstract_state, where: Path, data_iter=None,
                  with_data: bool = True, step: int | None = None):
    """Restores the newest readable step (or `step`); a corrupt or truncated one is reported by name and
    the previous good one used. Returns (state, meta, step) or None when there is nothing to restore."""
    import grain.python as grain
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    for s in steps:
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if with_data and data_iter is not None and hasattr(data_iter, "get_state"):
            items["data"] = grain.PyGrainCheckpointRestore(data_iter)
        try:
            _check_same_structure(abstract_state, manager, s, where)
            restored = manager.restore(s, args=ocp.args.Composite(**items))
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 — any read failure means this step is unusable
            log.error("checkpoint %s/%s is unreadable (%s: %s); trying the previous one", where, s,
                      type(e).__name__, str(e)[:300])
            print(f"[jaxboost] checkpoint {where}/{s} is corrupt or truncated ({type(e).__name__}); "
                  f"falling back to the previous good checkpoint: {str(e)[:300]}", flush=True)
            continue
        return restored["state"], dict(restored["meta"]), s
    if steps:
        raise RuntimeError(f"none of the checkpoints {sorted(steps)} under {where} could be read; move the "
                           f"folder away to start afresh")
    return None


def load_params(workdir: str | Path, abstract_state, prefer: str = "best"):
    """Params (and EMA params) of another run, e.g. the pretraining run for a fresh finetune."""
    workdir = Path(workdir).absolute()
    order = ["best", "ckpt"] if prefer == "best" else ["ckpt", "best"]
    for sub in order:
        if not (workdir / sub).is_dir():
            continue
        import grain.python as grain
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        if sub == "ckpt":  # latest checkpoints also hold the data position, which is not wanted here
            handlers["data"] = grain.PyGrainCheckpointHandler()
        mgr = ocp.CheckpointManager(workdir / sub, item_handlers=handlers)
        if mgr.latest_step() is None:
            continue
        got = restore_state(mgr, abstract_state, workdir / sub, with_data=False)
        if got is not None:
            return got
    raise FileNotFoundError(f"no readable checkpoint under {workdir}/best or {workdir}/ckpt")


# ------------------------------------------------------------------------------------------ the loop

class _Preemption:
    """SIGTERM (preemption) sets a flag; the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class Preempted(SystemExit):
    pass


def _preemption_agreed(preempt: _Preemption, step: int, config) -> bool:
    """All hosts must save at the same step: with several processes the flags are combined every
    `preemption_check_every` steps (one tiny all-gather), so no host saves alone and deadlocks."""
    if jax.process_count() == 1:
        return preempt.requested
    if step % config.get("preemption_check_every", 10):
        return False
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(preempt.requested))).any())


def _loop_meta(step, best, best_step, stale, plateau_state, config) -> dict:
    return {"step": int(step), "best_metric": best, "best_step": best_step, "stale_evals": stale,
            "plateau": {k: float(v) for k, v in plateau_state._asdict().items()} if plateau_state else None,
            "config": json.loads(config.to_json_best_effort())}


def _restore_plateau(d):
    if not d:
        return None
    from optax.contrib import ReduceLROnPlateauState
    types = ReduceLROnPlateauState.__annotations__
    return ReduceLROnPlateauState(**{k: jnp.asarray(v, jnp.int32 if "count" in k else jnp.float32)
                                     for k, v in d.items() if k in types})


def fit(config: ConfigDict, workdir: str | Path, *, init_fn: Callable[[], TrainState], step_fn: Callable,
        train_iter: Iterator, eval_fn: Callable[[TrainState], dict] | None = None,
        prepare_batch: Callable[[dict], dict] | None = None, mesh=None, state_rules=(),
        on_log: Callable[[TrainState, int], None] | None = None) -> tuple[TrainState, dict]:
    """Runs `config.total_steps` steps of `step_fn`; returns the final state and a summary dict.

    Config fields read here: total_steps, log_every, eval_every, ckpt_every, keep_checkpoints,
    async_checkpointing, best_metric, best_mode, early_stop_patience (evals, 0 = off), plateau_patience
    (evals, torch semantics; 0 = off), plateau_factor, init_from, finetune_mode ("fresh" | "resume").
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or parallel.mesh_from_config(config)
    total_steps = int(config.total_steps)
    best_metric = (config.get("best_metric", None) or None) if eval_fn is not None else None
    best_mode = config.get("best_mode", "max")
    sign = 1.0 if best_mode == "max" else -1.0
    ckpts = Checkpoints(workdir, keep=config.get("keep_checkpoints", 3),
                        async_save=config.get("async_checkpointing", True), best_metric=best_metric,
                        best_mode=best_mode, data_iter=train_iter)
    if parallel.is_main_process():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    abstract = jax.eval_shape(init_fn)
    shardings = parallel.shardings_for(abstract, mesh, state_rules)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    plateau_tx = None
    if config.get("plateau_patience", 0):
        from optax.contrib import reduce_on_plateau
        # optax reduces once `patience` stale values are seen; torch once more than `patience` are.
        # Any improvement resets the count (torch with threshold=0; optax wants a positive tolerance).
        plateau_tx = reduce_on_plateau(factor=config.get("plateau_factor", 0.1),
                                       patience=int(config.plateau_patience) + 1, rtol=0.0, atol=1e-12)
    plateau_state = plateau_tx.init({}) if plateau_tx else None
    best, best_step, stale = None, None, 0

    restored = restore_state(ckpts.latest, abstract_sharded, workdir / "ckpt", train_iter)
    init_from = config.get("init_from", "") or ""
    if restored is not None:
        state, meta, _ = restored
        print(f"[jaxboost] resumed {workdir} at step {int(state.step)}", flush=True)
    elif init_from and config.get("finetune_mode", "fresh") == "resume":
        # The public code's behaviour, kept for comparison: continue the pretraining run's optimiser,
        # schedule position, step counter and early-stopping state on the new data.
        state, meta, _ = load_params(init_from, abstract_sharded, prefer="latest")
        print(f"[jaxboost] finetune_mode=resume: continuing the state of {init_from} at step {int(state.step)}")
    else:
        state = jax.jit(init_fn, out_shardings=shardings)()
        meta = {}
        if init_from:
            src, _, _ = load_params(init_from, abstract_sharded, prefer="best")
            state = state.replace(params=src.params,
                                  ema_params=src.ema_params if state.ema_params is not None else None,
                                  extra=src.extra if state.extra is not None else None)
            print(f"[jaxboost] initialised params from {init_from}; fresh optimiser and schedule", flush=True)
    best, best_step, stale = meta.get("best_metric"), meta.get("best_step"), meta.get("stale_evals", 0)
    plateau_state = _restore_plateau(meta.get("plateau")) or plateau_state

    jit_step = jax.jit(step_fn, out_shardings=(shardings, None), donate_argnums=(0,))
    writer = MetricWriter(workdir)
    start = int(state.step)
    summary: dict[str, Any] = {"start_step": start}

    def check_finite(metrics, step):
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            ckpts.wait()
            good = ckpts.latest.latest_step()
            raise FloatingPointError(f"loss is {loss} at step {step}; stopped. Last good checkpoint: "
                                     f"{workdir / 'ckpt'}/{good}" if good is not None else
                                     f"loss is {loss} at step {step}; stopped before any checkpoint")
        return loss

    def do_eval(state, step):
        nonlocal best, best_step, stale, plateau_state
        metrics = eval_fn(state)
        value = metrics.get(best_metric) if best_metric else None
        if value is not None:
            improved = best is None or sign * (value - best) > 0
            if improved:
                best, best_step, stale = float(value), step, 0
                ckpts.save_best(step, state, _loop_meta(step, best, best_step, stale, plateau_state, config),
                                {best_metric: float(value)})
            else:
                stale += 1
            if plateau_tx is not None:
                _, plateau_state = plateau_tx.update({}, plateau_state, value=jnp.asarray(-sign * value))
                state = set_lr_scale(state, float(plateau_state.scale))
        writer.write(step, {**metrics, **({f"best/{best_metric}": best} if best is not None else {})})
        return state, metrics

    from tqdm.auto import tqdm
    last_metrics: dict = {}
    eval_history = []
    with _Preemption() as preempt:
        bar = tqdm(total=total_steps, initial=start, desc=config.get("name", "train"), mininterval=5.0,
                   disable=not parallel.is_main_process(), dynamic_ncols=True)
        t0, step = time.time(), start
        for step in range(start, total_steps):
            host_batch = next(train_iter)
            if prepare_batch is not None:
                host_batch = prepare_batch(host_batch)
            batch = parallel.shard_batch(mesh, host_batch)
            state, metrics = jit_step(state, batch)
            done = step + 1
            bar.update(1)
            if done % config.get("log_every", 50) == 0 or done == total_steps:
                m = jax.device_get(metrics)
                loss = check_finite(m, done)
                m["steps_per_s"] = (done - start) / max(time.time() - t0, 1e-9)
                writer.write(done, {f"train/{k}": v for k, v in m.items()})
                bar.set_postfix(loss=f"{loss:.4f}")
                last_metrics = m
                if on_log is not None:
                    on_log(state, done)
            if eval_fn is not None and config.get("eval_every", 0) and (done % config.eval_every == 0 or done == total_steps):
                state, em = do_eval(state, done)
                eval_history.append({"step": done, "wall_s": time.time() - t0, **{k: float(v) for k, v in em.items()}})
            if config.get("ckpt_every", 0) and done % config.ckpt_every == 0:
                check_finite(jax.device_get(metrics), done)
                ckpts.save(done, state, _loop_meta(done, best, best_step, stale, plateau_state, config), train_iter)
            if _preemption_agreed(preempt, done, config):
                check_finite(jax.device_get(metrics), done)
                ckpts.save(done, state, _loop_meta(done, best, best_step, stale, plateau_state, config),
                           train_iter, force=True)
                ckpts.close()
                writer.close()
                print(f"[jaxboost] SIGTERM: saved step {done} to {workdir / 'ckpt'}; exiting", flush=True)
                raise Preempted(143)
            patience = config.get("early_stop_patience", 0)
            if patience and stale >= patience:
                print(f"[jaxboost] early stop at step {done}: {best_metric} has not improved for {stale} evals "
                      f"(best {best:.4f} at step {best_step})", flush=True)
                break
        else:
            done = total_steps if total_steps > start else start
        bar.close()
    final_step = int(state.step)
    ckpts.wait()
    if ckpts.latest.latest_step() != final_step:
        if final_step > start:
            check_finite(jax.device_get(metrics), final_step)
        ckpts.save(final_step, state, _loop_meta(final_step, best, best_step, stale, plateau_state, config),
                   train_iter, force=True)
    ckpts.close()
    writer.close()
    summary.update(final_step=final_step, best_metric=best, best_step=best_step, last_train=
                   {k: float(v) for k, v in last_metrics.items() if np.ndim(v) == 0}, evals=eval_history,
                   wall_s=time.time() - t0)
    return state, summary


# ------------------------------------------------------------------------------------------ evaluation

def map_batches(fn: Callable, params, batches, mesh, batch_size: int):
    """Runs jitted `fn(params, batch) -> pytree of arrays [B, ...] (or scalars)` over host batches of any
    size: each is padded to `batch_size` (a multiple of the mesh's batch shards), sharded, and the padding
    cut off the per-example outputs (scalars, e.g. a batch loss, are passed through as they are).
    Yields (host_batch, numpy outputs)."""
    parallel.check_batch_divides(mesh, batch_size)
    # Every host holds the whole eval batch; outputs are replicated so each host can read them all.
    jfn = jax.jit(fn, out_shardings=parallel.replicated(mesh))
    for host_batch in batches:
        n = len(next(iter(v for v in host_batch.values() if np.asarray(v).dtype.kind in "biuf")))
        padded = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], batch_size - n, 0)])
                  if np.asarray(v).dtype.kind in "biuf" else v for k, v in host_batch.items()}
        out = jax.device_get(jfn(params, parallel.shard_global_batch(mesh, padded)))
        yield host_batch, jax.tree.map(lambda a: np.asarray(a)[:n] if np.ndim(a) else np.asarray(a), out)

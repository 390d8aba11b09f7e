"""`fit`: the one training loop every Task (train/task.py) runs.

Mesh, parameters created already sharded, `donate_argnums`, orbax (latest-N + best, async, data-iterator
position, fallback to the previous good step), TensorBoard + JSONL metrics, progress bar, NaN stop, SIGTERM /
SIGINT save, plateau LR, early stopping and pretrain->finetune initialisation live here once.

Config fields read here: log_every, keep_checkpoints, async_checkpointing, best_metric, best_mode,
early_stop_patience (evals, 0 = off), plateau_patience (evals, torch semantics; 0 = off), plateau_factor,
init_from, finetune_mode ("fresh" | "resume"), preemption_check_every, profile_steps ("A,B": a jax.profiler
trace of those steps in the workdir). The run length is the Task's.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxboost import parallel
from jaxboost.train import checkpoints as ckpt_lib
from jaxboost.train import workdir as workdir_lib
from jaxboost.train.metrics_writer import MetricWriter, StepCost, reference_peak
from jaxboost.train.optim import set_lr_scale
from jaxboost.train.preemption import Preemption
from jaxboost.train.state import TrainState
from jaxboost.train.task import Task


@dataclasses.dataclass
class LoopState:
    """What the loop carries between evals and saves it into every checkpoint's meta."""
    best: float | None = None
    best_step: int | None = None
    stale: int = 0
    plateau: Any = None

    def meta(self, step: int) -> dict:
        plateau = {k: float(v) for k, v in self.plateau._asdict().items()} if self.plateau else None
        return {"step": int(step), "best_metric": self.best, "best_step": self.best_step,
                "stale_evals": self.stale, "plateau": plateau}

    @classmethod
    def from_meta(cls, meta: dict, plateau_init):
        return cls(meta.get("best_metric"), meta.get("best_step"), meta.get("stale_evals", 0),
                   _restore_plateau(meta.get("plateau")) or plateau_init)


def _restore_plateau(d):
    if not d:
        return None
    from optax.contrib import ReduceLROnPlateauState
    types = ReduceLROnPlateauState.__annotations__
    return ReduceLROnPlateauState(**{k: jnp.asarray(v, jnp.int32 if "count" in k else jnp.float32)
                                     for k, v in d.items() if k in types})


def _plateau_tx(config):
    if not config.get("plateau_patience", 0):
        return None
    from optax.contrib import reduce_on_plateau
    # optax reduces once `patience` stale values are seen; torch once more than `patience` are.
    # Any improvement resets the count (torch with threshold=0; optax wants a positive tolerance).
    return reduce_on_plateau(factor=config.get("plateau_factor", 0.1), patience=int(config.plateau_patience) + 1,
                             rtol=0.0, atol=1e-12)


def _initial_state(task: Task, workdir, ckpts, abstract_sharded, shardings, train_iter):
    """Resume WORKDIR, else continue (finetune_mode=resume) or initialise from init_from, else start fresh."""
    config = task.config
    restored = ckpt_lib.restore_state(ckpts.latest, abstract_sharded, workdir / "ckpt", train_iter)
    init_from = config.get("init_from", "") or ""
    if task.info.get("init_from_mapped"):   # the task mapped another run's tree into its own init_state
        init_from = ""
    if restored is not None:
        state, meta, _ = restored
        print(f"[jaxboost] resumed {workdir} at step {int(state.step)}", flush=True)
        return state, meta, True
    if init_from and config.get("finetune_mode", "fresh") == "resume":
        # The public code's behaviour, kept for comparison: continue the pretraining run's optimiser,
        # schedule position, step counter and early-stopping state on the new data.
        state, meta, _ = ckpt_lib.load_params(init_from, abstract_sharded, prefer="latest")
        print(f"[jaxboost] finetune_mode=resume: continuing the state of {init_from} at step {int(state.step)}")
        return state, meta, False
    state = task.create_state(shardings)
    if init_from:
        src, _, _ = ckpt_lib.load_params(init_from, abstract_sharded, prefer="best")
        state = state.replace(params=src.params,
                              ema_params=src.ema_params if state.ema_params is not None else None,
                              extra=src.extra if state.extra is not None else None)
        print(f"[jaxboost] initialised params from {init_from}; fresh optimiser and schedule", flush=True)
    return state, {}, False


class _Run:
    """One fit's moving parts: the task, its checkpoints and writer, and the loop state."""

    def __init__(self, task: Task, workdir, ckpts, writer, loop_state: LoopState):
        self.task, self.workdir, self.ckpts, self.writer, self.ls = task, workdir, ckpts, writer, loop_state
        self.best_metric = (task.config.get("best_metric", None) or None) if task.evaluate else None
        self.sign = 1.0 if task.config.get("best_mode", "max") == "max" else -1.0
        self.plateau_tx = _plateau_tx(task.config)

    def check_finite(self, metrics, step) -> float:
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            self.ckpts.wait()
            good = self.ckpts.latest.latest_step()
            raise FloatingPointError(f"loss is {loss} at step {step}; stopped. Last good checkpoint: "
                                     f"{self.workdir / 'ckpt'}/{good}" if good is not None else
                                     f"loss is {loss} at step {step}; stopped before any checkpoint")
        return loss

    def save(self, step, state, metrics, train_iter, force=False):
        self.check_finite(jax.device_get(metrics), step)
        self.ckpts.save(step, state, self.ls.meta(step), train_iter, force=force)

    def evaluate(self, state: TrainState, step: int):
        ls, metrics = self.ls, self.task.evaluate(state, self.task.eval_split)
        value = metrics.get(self.best_metric) if self.best_metric else None
        if value is not None:
            if ls.best is None or self.sign * (value - ls.best) > 0:
                ls.best, ls.best_step, ls.stale = float(value), step, 0
                self.ckpts.save_best(step, state, ls.meta(step), {self.best_metric: float(value)})
            else:
                ls.stale += 1
            if self.plateau_tx is not None:
                _, ls.plateau = self.plateau_tx.update({}, ls.plateau, value=jnp.asarray(-self.sign * value))
                state = set_lr_scale(state, float(ls.plateau.scale))
        best = {f"best/{self.best_metric}": ls.best} if ls.best is not None else {}
        self.writer.write(step, {**metrics, **best})
        return state, metrics

    def early_stop(self, done: int) -> bool:
        patience = self.task.config.get("early_stop_patience", 0)
        if patience and self.ls.stale >= patience:
            print(f"[jaxboost] early stop at step {done}: {self.best_metric} has not improved for {self.ls.stale} "
                  f"evals (best {self.ls.best:.4f} at step {self.ls.best_step})", flush=True)
            return True
        return False


class StepClock:
    """Per log window: seconds per step excluding the first step's compile, evals and saves; examples/s; and
    the fraction of that time spent waiting for the input pipeline (reading, transforms, tokenization)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.window_start, self.excluded, self.input_s, self.steps = now, 0.0, 0.0, 0

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def read(self) -> dict:
        """At a log boundary (after the metrics were fetched, so the steps have run)."""
        now = time.perf_counter()
        busy = max(now - self.window_start - self.excluded, 1e-9)
        out = {}
        if self.steps:
            step_time = busy / self.steps
            out = {"step_time_s": step_time, "examples_per_s": self.batch_size / step_time,
                   "input_wait_frac": min(self.input_s / busy, 1.0)}
        self._reset(now)
        return out


# jax.monitoring's spans of tracing, lowering to MLIR and XLA compiling (a persistent-cache read is inside the
# compile span): wall-clock seconds of the thread that calls the jitted function, which waits for them. An
# eval's `compile_s` is their sum since the run's first step, so a time to accuracy can be read with and
# without the compiles (the first run of a config compiles what later runs read from the persistent cache).
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _count_compile(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_clock():
    """() -> seconds this process has spent tracing and compiling since this call (all threads)."""
    k0 = _compile_seconds[0]
    return lambda: _compile_seconds[0] - k0


def _timed(clock: StepClock, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    clock.exclude(time.perf_counter() - t)
    return out


def _next_batch(task: Task, train_iter, clock: StepClock):
    t = time.perf_counter()
    host_batch = next(train_iter)
    if task.prepare_batch is not None:
        host_batch = task.prepare_batch(host_batch)
    clock.input_s += time.perf_counter() - t
    return parallel.shard_batch(task.mesh, host_batch)


def profile_window(config) -> tuple[int, int] | None:
    """`config.profile_steps` "A,B" -> (A, B): trace steps A..B (1-based, as the step counter after each
    step), or None when empty."""
    text = str(config.get("profile_steps", "") or "").strip()
    if not text:
        return None
    try:
        first, last = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"config.profile_steps={text!r}: give two step numbers A,B (e.g. 10,20)") from None
    if not 1 <= first <= last:
        raise ValueError(f"config.profile_steps={text!r}: need 1 <= A <= B")
    return first, last


class Profiler:
    """A jax.profiler trace of steps A..B written into the workdir, where TensorBoard's profile plugin
    looks for it (WORKDIR/plugins/profile/<run>/<host>.xplane.pb)."""

    def __init__(self, config, workdir):
        self.window, self.workdir, self.active = profile_window(config), workdir, False

    def before(self, step: int) -> None:
        """Before running the step that makes the counter `step`."""
        if self.window and step == self.window[0] and not self.active:
            jax.profiler.start_trace(str(self.workdir))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.window[1]:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self.active:
            jax.block_until_ready(outputs)  # the traced steps' device work, not only their dispatch
            jax.profiler.stop_trace()
            self.active = False


def _progress(config, task, length, initial: int):
    """The step bar, made once the first step has compiled, so its rate and ETA count steps only."""
    from tqdm.auto import tqdm
    return tqdm(total=length.total_steps, initial=initial, desc=config.get("name", task.name), mininterval=5.0,
                disable=not parallel.is_main_process(), dynamic_ncols=True)


def _in_phase(bar, what: str, fn, *args):
    """Runs fn(*args) with the bar saying what the loop is doing (evaluation and checkpoints take seconds
    to minutes with no step moving)."""
    if bar.disable:  # processes other than 0: a disabled tqdm has no description
        return fn(*args)
    desc = bar.desc
    bar.set_description_str(f"{desc} ({what})", refresh=True)
    try:
        return fn(*args)
    finally:
        bar.set_description_str(desc, refresh=False)


def _train_steps(run: _Run, state, train_iter, preempt: Preemption):
    """The step loop; returns (state, last step metrics, last logged metrics, eval history, wall seconds)."""
    task, config, length = run.task, run.task.config, run.task.length
    jit_step = jax.jit(task.step_fn, out_shardings=(run.shardings, None), donate_argnums=(0,))
    start = int(state.step)
    last, history, metrics, t0, clock = {}, [], None, time.time(), StepClock(int(config.get("batch_size", 0)))
    c0 = time.process_time()  # the process's CPU seconds: a cost that does not grow with other jobs' load
    compiling = compile_clock()
    bar, cost, profiler = None, None, Profiler(config, run.workdir)
    for step in range(start, length.total_steps):
        batch = _next_batch(task, train_iter, clock)
        profiler.before(step + 1)
        if step == start:   # the compile: not a step's time
            if parallel.is_main_process():
                print(f"[jaxboost] compiling the {task.name} step ...", flush=True)
            compiled = _timed(clock, lambda: jit_step.lower(state, batch).compile())
            # Several processes start the step's collectives together, however long each took to compile.
            _timed(clock, parallel.wait_for_processes, "train step compiled")
            # The same executable as the jit's next calls (its cache), for its FLOP count and buffer sizes.
            state, metrics = _timed(clock, lambda: jax.block_until_ready(compiled(state, batch)))
            cost = _timed(clock, lambda: StepCost(compiled, task.mesh.devices.flat))
            bar = _progress(config, task, length, step)
        else:
            state, metrics = jit_step(state, batch)
            clock.steps += 1
        done = step + 1
        bar.update(1)
        profiler.after(done, (state, metrics))
        if done % config.get("log_every", 50) == 0 or done == length.total_steps:
            last = jax.device_get(metrics)
            bar.set_postfix(loss=f"{run.check_finite(last, done):.4f}")
            timing = clock.read()
            last.update(steps_per_s=(done - start) / max(time.time() - t0, 1e-9), **timing,
                        **cost.read(timing.get("step_time_s")))
            run.writer.write(done, {f"train/{k}": v for k, v in last.items()})
        if task.evaluate and length.eval_every and (done % length.eval_every == 0 or done == length.total_steps):
            # The dispatched steps finish on the step clock: the eval's own time is what it excludes.
            jax.block_until_ready(state)
            state, em = _in_phase(bar, "evaluating", _timed, clock, run.evaluate, state, done)
            history.append({"step": done, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
                            "compile_s": compiling(), **{k: float(v) for k, v in em.items()}})
        if length.ckpt_every and done % length.ckpt_every == 0:
            jax.block_until_ready(state)
            _in_phase(bar, "saving", _timed, clock, run.save, done, state, metrics, train_iter)
        if preempt.agreed(done, config.get("preemption_check_every", 10)):
            run.save(done, state, metrics, train_iter, force=True)
            run.close()
            raise preempt.exit(done, run.workdir / "ckpt")
        if run.early_stop(done):
            break
    profiler.stop((state, metrics))  # a window past the run's last step ends with the run
    if bar is not None:
        bar.close()
    return state, metrics, last, history, time.time() - t0


def fit(task: Task, workdir) -> tuple[TrainState, dict]:
    """Runs `task.length.total_steps` steps of the task's step; returns the final state and a summary."""
    workdir = workdir_lib.resolve(workdir)
    with workdir_lib.WorkdirLock(workdir):
        return _fit_locked(task, workdir)


def _fit_locked(task: Task, workdir) -> tuple[TrainState, dict]:
    config = task.config
    train_iter = task.train_loader()
    abstract = jax.eval_shape(task.init_state)
    shardings = parallel.shardings_for(abstract, task.mesh)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)
    run = _Run(task, workdir, None, None, None)
    run.ckpts = ckpt_lib.Checkpoints(workdir, keep=config.get("keep_checkpoints", 3),
                                     async_save=config.get("async_checkpointing", True), best_metric=run.best_metric,
                                     best_mode=config.get("best_mode", "max"), data_iter=train_iter)
    workdir_lib.check_same_corpus(workdir, config)
    state, meta, _ = _initial_state(task, workdir, run.ckpts, abstract_sharded, shardings, train_iter)
    # Accepted: only now does the run write into the workdir.
    workdir_lib.record(workdir, config, {"task": task.name, **dataclasses.asdict(task.length), **task.info})
    run.shardings = shardings
    run.ls = LoopState.from_meta(meta, run.plateau_tx.init({}) if run.plateau_tx else None)
    run.writer = MetricWriter(workdir, resume_step=int(state.step))
    run.close = lambda: (run.ckpts.close(), run.writer.close())
    start = int(state.step)
    # A CPU's matmul rate for MFU (~1 s of matmuls, once per process) belongs to the machine, not to this
    # run's clock, which starts with the first step.
    reference_peak()
    with Preemption() as preempt:
        state, metrics, last, history, wall = _train_steps(run, state, train_iter, preempt)
    final_step = int(state.step)
    run.ckpts.wait()
    if run.ckpts.latest.latest_step() != final_step:
        if final_step > start:
            run.check_finite(jax.device_get(metrics), final_step)
        run.ckpts.save(final_step, state, run.ls.meta(final_step), train_iter, force=True)
    run.close()
    summary = {"start_step": start, "final_step": final_step, "best_name": run.best_metric, "best_metric": run.ls.best,
               "best_step": run.ls.best_step, "evals": history, "wall_s": wall,
               "last_train": {k: float(v) for k, v in last.items() if np.ndim(v) == 0}}
    return state, summary

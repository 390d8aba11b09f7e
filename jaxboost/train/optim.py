"""The optimiser every task uses: a named lr schedule, AdamW/Adam/SGD, frozen and lr-scaled parameter groups,
global-norm clipping, and an injected `lr_scale` that reduce-on-plateau lowers."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from jaxboost import parallel
from jaxboost.registry import Registry
from jaxboost.train.state import TrainState

SCHEDULES = Registry("lr schedule")


@SCHEDULES.register("constant")
def _constant(o: ConfigDict, total_steps: int, steps_per_epoch: int):
    warmup = int(o.get("warmup_steps", 0))
    if not warmup:
        return optax.constant_schedule(o.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup])


@SCHEDULES.register("cosine")
def _cosine(o: ConfigDict, total_steps: int, steps_per_epoch: int):
    warmup = int(o.get("warmup_steps", 0))
    # a run shorter than its warm-up (a smoke run) ends inside the warm-up; optax needs decay after it
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else o.lr, o.lr, warmup, max(total_steps, warmup + 1),
                                              0.0)


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


OPTIMIZERS = Registry("optimizer")


@OPTIMIZERS.register("adamw")
def _adamw(o: ConfigDict, schedule):
    return optax.adamw(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8),
                       weight_decay=o.get("weight_decay", 0.0))


@OPTIMIZERS.register("adam")
def _adam(o: ConfigDict, schedule):
    return optax.adam(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8))


@OPTIMIZERS.register("sgd")
def _sgd(o: ConfigDict, schedule):
    return optax.sgd(schedule, momentum=o.get("momentum", 0.9))


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


def make_optimizer(config: ConfigDict, total_steps: int, steps_per_epoch: int = 1, *, frozen=None,
                   lr_mults=None) -> optax.GradientTransformation:
    """The optimiser of `config.optim` with a named schedule, global-norm clipping, frozen parameter groups
    (regexes in `optim.frozen` plus `frozen`: no update, no weight decay) and per-group lr multipliers
    (`optim.lr_mults` plus `lr_mults`, e.g. the CRIS backbone at 0.1x). `lr_scale` is an injected
    hyper-parameter the loop lowers on plateau."""
    o = config.optim
    schedule = SCHEDULES.get(o.get("schedule", "constant"))(o, total_steps, steps_per_epoch)
    frozen = [*(o.get("frozen", []) or []), *(frozen or [])]
    lr_mults = {**dict(o.get("lr_mults", {}) or {}), **dict(lr_mults or {})}
    make = OPTIMIZERS.get(o.get("name", "adamw"))

    def group(mult: float):
        return make(o, (lambda s: schedule(s) * mult) if mult != 1.0 else schedule)

    def build(lr_scale):
        transforms = {"base": group(1.0), "frozen": optax.set_to_zero()}
        transforms.update({f"mult{i}": group(float(m)) for i, m in enumerate(lr_mults.values())})
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

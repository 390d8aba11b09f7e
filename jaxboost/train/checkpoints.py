"""orbax checkpoints of a run: the latest N steps (with the data iterator's position) and the best step,
a structure check that names mismatched keys, and fallback to the previous good step when one is corrupt."""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from jaxboost import parallel
from jaxboost.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint is readable but holds another model/config's tree."""


@functools.cache
def _host_copies_on_cpu() -> None:
    """On a CPU backend, orbax's arrays are saved without replica-parallel slicing.

    orbax slices a replicated array into one part per replica so that each device copies its part to the host
    at once. Each part is its own jitted slice with static offsets, compiled once per leaf shape, per replica,
    per process (8 replicas of a 40-leaf tree: 320 programs and 20 s on 2 cores, against 0.2 s for the same
    save without). A CPU's "device to host" is a memcpy with nothing to parallelise, and orbax already turns
    it off under JAX_PLATFORMS=gpu. Every other backend keeps orbax's default; the files are the same."""
    if jax.default_backend() != "cpu":
        return
    absl_log = logging.getLogger("absl")   # its one "overriding jax.Array" warning is this, on purpose
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
        absl_log.setLevel(level)


def _handlers(with_data: bool) -> dict:
    _host_copies_on_cpu()
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if with_data:
        import grain.python as grain
        handlers["data"] = grain.PyGrainCheckpointHandler()
    return handlers


# A better step's state is held on device and written with the next latest checkpoint (or at `wait`) when
# it is at most this big: a run whose validation improves at most evals (the demo's segmenters: ~21 times
# in 30 evals, ~0.2 s of orbax work each) writes its best once instead of every time. Bigger states (the
# full SDM) are written at once rather than held twice in device memory.
DEFER_BEST_MAX_BYTES = 1 << 30


# One program copies the whole state: `jax.tree.map(jnp.copy, state)` dispatched one copy per leaf and compiled
# one per distinct leaf shape the first time (18 for the demo's CLIPSeg, ~0.5 s on 2 loaded cores; 61 shapes
# took 4.8 s), inside the run's clock at its first better validation.
_copy_state = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _nbytes(tree) -> int:
    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(tree))


class Checkpoints:
    """orbax managers for the latest N steps and the best-by-metric step, with the data iterator's
    position and a small JSON of loop state (early stopping, plateau, best) saved beside the arrays.

    The best step may be held (a device copy) until the next `save` or `wait`: it is on disk before any
    latest checkpoint whose meta names it, so a resumed run always finds the best its meta records."""

    def __init__(self, workdir: epath.Path, keep: int = 3, async_save: bool = True, best_metric: str | None = None,
                 best_mode: str = "max", data_iter=None):
        self.workdir = epath.Path(workdir)
        self.has_data = data_iter is not None and hasattr(data_iter, "get_state")
        self.latest = ocp.CheckpointManager(
            self.workdir / "ckpt", item_handlers=_handlers(self.has_data),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save))
        self.best = None
        if best_metric:
            # Async as the latest ones: the loop goes on while a better step's arrays, already copied to the
            # host, are written (a synchronous save of the tiny demo segmenters' 3 MB cost more than an
            # epoch's six steps). `wait` (before a NaN stop, the final save and `close`) finishes them.
            self.best = ocp.CheckpointManager(
                self.workdir / "best", item_handlers=_handlers(False),
                options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[best_metric],
                                                     best_mode=best_mode, enable_async_checkpointing=async_save))
        self._pending_best = None

    def save(self, step: int, state: TrainState, meta: dict, data_iter=None, force: bool = False) -> None:
        if self.best is not None:
            # A latest step's meta names the best step: that one is on disk first, so a run killed while
            # both are written never resumes from a meta whose best checkpoint is missing.
            self.flush_best()
            self.best.wait_until_finished()
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if self.has_data and data_iter is not None:
            import grain.python as grain
            items["data"] = grain.PyGrainCheckpointSave(data_iter)
        self.latest.save(step, args=ocp.args.Composite(**items), force=force)

    def save_best(self, step: int, state: TrainState, meta: dict, metrics: dict) -> None:
        if self.best is None:
            return
        if _nbytes(state) <= DEFER_BEST_MAX_BYTES:
            # a copy: the loop donates `state` to the next step
            self._pending_best = (step, _copy_state(state), meta, metrics)
        else:
            self._pending_best = None
            self._write_best(step, state, meta, metrics)

    def _write_best(self, step: int, state: TrainState, meta: dict, metrics: dict) -> None:
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), metrics=metrics)

    def flush_best(self) -> None:
        """Writes the held best step, if any (asynchronously, as every save)."""
        if self._pending_best is not None:
            pending, self._pending_best = self._pending_best, None
            self._write_best(*pending)

    def wait(self) -> None:
        if self.best is not None:
            self.flush_best()
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        if self.best is not None:
            self.best.close()


def _check_same_structure(abstract_state, manager: ocp.CheckpointManager, step: int, where) -> None:
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


def restore_state(manager: ocp.CheckpointManager, abstract_state, where, data_iter=None,
                  with_data: bool = True, step: int | None = None):
    """Restores the newest readable step (or `step`); a corrupt or truncated one is reported by name and
    the previous good one used. Returns (state, meta, step) or None when there is nothing to restore."""
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    for s in steps:
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if with_data and data_iter is not None and hasattr(data_iter, "get_state"):
            import grain.python as grain
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


def load_params(workdir, abstract_state, prefer: str = "best"):
    """(state, meta, step) of a finished or running run's best (or latest) checkpoint."""
    workdir = epath.Path(workdir)
    order = ["best", "ckpt"] if prefer == "best" else ["ckpt", "best"]
    for sub in order:
        if not (workdir / sub).is_dir():
            continue
        # latest checkpoints also hold the data position, which is not wanted here
        mgr = ocp.CheckpointManager(workdir / sub, item_handlers=_handlers(sub == "ckpt"))
        if mgr.latest_step() is None:
            continue
        got = restore_state(mgr, abstract_state, workdir / sub, with_data=False)
        if got is not None:
            return got
    raise FileNotFoundError(f"no readable checkpoint under {workdir}/best or {workdir}/ckpt")


def load_ema_params(workdir, abstract_state, shardings):
    """The `ema_params` subtree alone of a run's newest readable checkpoint (ckpt/, then best/), each leaf
    restored straight into its sharding (a tree like abstract_state.ema_params): sampling never holds the
    params and Adam moments (3/4 of a TrainState) nor a replicated copy. A checkpoint of another config is
    refused by name (the structure check). Returns (ema params, step)."""
    workdir = epath.Path(workdir)
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          abstract_state.ema_params, shardings)
    args = ocp.args.PyTreeRestore(item={"ema_params": target}, partial_restore=True,
                                  restore_args={"ema_params": ocp.checkpoint_utils.construct_restore_args(target)})
    for sub in ("ckpt", "best"):
        if not (workdir / sub).is_dir():
            continue
        _host_copies_on_cpu()
        manager = ocp.CheckpointManager(workdir / sub, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
        for step in sorted(manager.all_steps(), reverse=True):
            _check_same_structure(abstract_state, manager, step, workdir / sub)
            try:
                restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]["ema_params"]
            except Exception as e:  # noqa: BLE001 - an unreadable step: fall back to the previous one
                log.error("checkpoint %s/%s/%s: EMA params unreadable (%s: %s); trying the previous one",
                          workdir, sub, step, type(e).__name__, str(e)[:300])
                continue
            return restored, step
    raise FileNotFoundError(f"no readable checkpoint with EMA params under {workdir}/ckpt or {workdir}/best")

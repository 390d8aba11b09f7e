"""The run's checkpoint managers: best-step saves are asynchronous, and a latest save never lands before
the best one its meta names."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxboost.train import checkpoints


def test_latest_save_waits_for_the_in_flight_best_save(tmp_path):
    ckpts = checkpoints.Checkpoints(tmp_path, keep=2, async_save=True, best_metric="val/dice")
    assert ckpts.best._options.enable_async_checkpointing   # the best step no longer blocks the loop
    state = {"w": jnp.arange(6.0)}
    ckpts.save_best(3, state, {"step": 3, "best_step": 3}, {"val/dice": 0.5})
    ckpts.save(3, state, {"step": 3, "best_step": 3})
    # no wait: the best step the latest meta names is already finalised on disk
    assert ckpts.best.all_steps() == [3] and (tmp_path / "best" / "3").is_dir()
    ckpts.close()
    restored = ocp.StandardCheckpointer().restore(tmp_path / "best" / "3" / "state")
    np.testing.assert_array_equal(restored["w"], np.arange(6.0))


def test_best_step_is_held_until_the_next_save_and_survives_donation(tmp_path):
    import jax
    ckpts = checkpoints.Checkpoints(tmp_path, keep=2, async_save=True, best_metric="val/dice")
    state = {"w": jnp.arange(6.0)}
    ckpts.save_best(2, state, {"step": 2, "best_step": 2}, {"val/dice": 0.4})
    ckpts.save_best(3, state, {"step": 3, "best_step": 3}, {"val/dice": 0.5})
    # the loop donates the state to its next step: the held best is a copy
    jax.jit(lambda s: {"w": s["w"] * 0}, donate_argnums=(0,))(state)
    assert ckpts.best.all_steps() == []          # held, not yet written
    ckpts.save(4, {"w": jnp.zeros(6)}, {"step": 4, "best_step": 3})
    assert ckpts.best.all_steps() == [3]         # written before the latest step that names it
    ckpts.save_best(5, {"w": jnp.ones(6)}, {"step": 5, "best_step": 5}, {"val/dice": 0.6})
    ckpts.close()                                # `wait` writes a best still held
    assert ckpts.best.all_steps() == [5]
    restored = ocp.StandardCheckpointer().restore(tmp_path / "best" / "5" / "state")
    np.testing.assert_array_equal(restored["w"], np.ones(6))


def test_saving_replicated_arrays_on_cpu_compiles_nothing(tmp_path):
    """orbax's replica-parallel save compiles one slice program per leaf shape and replica (on 8 CPU devices,
    ~0.06 s each: most of a tiny run's save); on a CPU backend the arrays are copied whole instead."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(jax.make_mesh((8,), ("data",)), PartitionSpec())
    state = {f"w{i}": jax.device_put(jnp.full((8, i + 1), float(i)), replicated) for i in range(5)}
    compiles = []

    def count(event, _, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        ckpts = checkpoints.Checkpoints(tmp_path, keep=1, async_save=False)
        ckpts.save(1, state, {"step": 1})
        ckpts.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt" / "1" / "state")
    np.testing.assert_array_equal(restored["w4"], np.full((8, 5), 4.0))

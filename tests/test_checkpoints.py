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

"""The evaluation path's batching: padding rows never reach the outputs, and `trim_last` pads a short batch
only to the mesh's batch shards."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxboost import parallel
from jaxboost.train import evaluator


def _mapper(trim_last: bool, seen: list):
    mesh = parallel.make_mesh(data=4, fsdp=1, devices=jax.devices()[:4])

    def fn(params, batch):
        seen.append(batch["x"].shape[0])   # traced once per batch shape
        return {"y": batch["x"] * params}
    return evaluator.BatchMapper(fn, mesh, batch_size=16, trim_last=trim_last)


def test_trim_last_pads_a_short_batch_to_the_shards_and_gives_the_same_outputs():
    x = np.arange(16 + 6, dtype=np.float32)
    batches = lambda: [{"x": x[:16], "id": list(range(16))}, {"x": x[16:], "id": list(range(16, 22))}]
    outs = {}
    for trim in (False, True):
        seen = []
        outs[trim] = list(_mapper(trim, seen)(jnp.float32(2.0), batches()))
        assert seen == ([16] if not trim else [16, 8])   # 6 rows -> 8 (4 shards), not 16
    for (b0, o0), (b1, o1) in zip(outs[False], outs[True]):
        assert b0["id"] == b1["id"]
        np.testing.assert_array_equal(o0["y"], o1["y"])
        np.testing.assert_array_equal(o0["y"], 2.0 * b0["x"])   # the padding rows are cut off

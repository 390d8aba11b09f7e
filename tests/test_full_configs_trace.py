"""The full-size configs trace for an 8-device mesh without allocating anything: jax.eval_shape of every
model's init, per-device params + AdamW bytes with and without FSDP, and the full SDM train step lowered
ahead of time with sharded abstract inputs."""
import jax
import numpy as np
import pytest

from benchmarks import memory

MIB = 2 ** 20


@pytest.fixture(scope="module")
def rows():
    assert jax.device_count() >= 8, "conftest sets 8 simulated devices"
    specs = memory.available_full_configs()
    assert "sdm.py:full" in specs
    return {spec: memory.measure(spec, jax.devices()[:8]) for spec in specs}


def test_full_configs_trace_and_fsdp_divides_their_memory(rows):
    for spec, row in rows.items():
        replicated = row.per_device_mib["data=8,fsdp=1"]
        # No FSDP: every device holds params + mu + nu whole (all float32 here).
        np.testing.assert_allclose(replicated, 3 * row.param_mib, rtol=1e-6, err_msg=spec)
        # FSDP: nearly everything is split; only small leaves (biases, norms) stay replicated.
        assert row.per_device_mib["data=2,fsdp=4"] < replicated / 4 * 1.02, spec
        assert row.per_device_mib["data=1,fsdp=8"] < replicated / 8 * 1.05, spec
        assert row.per_device_mib["data=1,fsdp=8"] < row.per_device_mib["data=2,fsdp=4"], spec
    # echo_from_noise's SDM; the number the config documents (the torch reference counts the same).
    assert rows["sdm.py:full"].params == 652_198_918
    table = memory.table(list(rows.values()))
    assert "| sdm.py:full | 652,198,918 |" in table


@pytest.mark.slow
def test_full_sdm_train_step_lowers_for_data_and_fsdp_mesh():
    from jaxboost import parallel
    from jaxboost.config import load_config
    config = load_config(str(memory.CONFIGS / "sdm.py:full"))
    mesh = parallel.make_mesh(2, 4, devices=jax.devices()[:8])
    lowered, production, shardings = memory.lower_train_step(config, mesh, 8)
    specs = [str(s.spec) for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))]
    assert any("fsdp" in s for s in specs)
    text = lowered.as_text()
    # The sharded program: params arrive split over fsdp (4-way) and the batch over all 8 devices.
    assert "mhlo.sharding" in text or "sdy.sharding" in text
    # params, EMA, mu, nu: each split 4 ways
    assert parallel.bytes_per_device(production.abstract_state, shardings) / MIB < 4 * 2_487.9 / 4 * 1.02

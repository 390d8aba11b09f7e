"""Many devices and many hosts: two jax.distributed processes x 2 devices train exactly like one process
with 4 devices; data vs FSDP meshes give the same step; the input order does not depend on the host count;
bad meshes, batches and coordinators fail with clear errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxboost import parallel, registry
from jaxboost.config import load_config
from jaxboost.data import pipeline
from jaxboost.train import metrics_writer, optim, state as state_lib, task as task_lib
from cpu_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env=None, timeout=600):
    out = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=timeout)
    if out.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-4000:]}")
    return out.stdout


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh")
    _run(["jaxboost", "phantom", "--out", str(root / "phantom"), "--patients", "8", "--size", "40", "32"])
    _run(["jaxboost", "corpus", "build", "--camus", str(root / "phantom"), "--out", str(root / "corpus"),
          "--size", "32"])
    return root / "corpus"


def _restore_state(workdir: Path, step: int) -> dict:
    """The TrainState tree a run saved at `step`, as numpy on one device (whatever mesh wrote it)."""
    path = (workdir / "ckpt" / str(step) / "state").absolute()
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
    return jax.tree.map(np.asarray, checkpointer.restore(path, abstract))


# ------------------------------------------------------------------------------------------- multi-process

@pytest.mark.slow
def test_two_processes_with_fsdp_train_like_one_process_with_four_devices(corpus_dir, tmp_path):
    args = ["--config", "configs/unet_phantom.py:tiny", f"--config.data.corpus={corpus_dir}",
            "--config.data.size=32", f"--config.total_steps={STEPS}", f"--config.eval_every={STEPS}",
            "--config.log_every=1", "--config.ckpt_every=0", "--config.optim.warmup_steps=2"]
    single_env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4))
    single = subprocess.Popen(["jaxboost", "train", *args, "--workdir", str(tmp_path / "one")], env=single_env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env = dict(os.environ, JAXBOOST_PORT=str(_free_port()))
    # The two-process run is also FSDP over all 4 devices (kernels split across the two hosts, so each
    # process writes different array shards); the single process is pure data parallel.
    multi = _run(["bash", "launch/local_multiprocess.sh", "2", "2", "jaxboost", "train", *args,
                  "--config.mesh.data=1", "--config.mesh.fsdp=4", "--workdir", str(tmp_path / "two")], env=env)
    single_out, _ = single.communicate(timeout=600)
    assert single.returncode == 0, single_out[-4000:]

    two, one = _restore_state(tmp_path / "two", STEPS), _restore_state(tmp_path / "one", STEPS)
    assert int(two["step"]) == int(one["step"]) == STEPS
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(two["params"])[0], jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=parallel._path_str(path))
    assert any(not np.allclose(a, b) for a, b in zip(  # the run really trained
        jax.tree.leaves(two["params"]), jax.tree.leaves(_init_params(corpus_dir))))
    two_losses, one_losses = ([m["train/loss"] for m in metrics_writer.read_metrics(w) if "train/loss" in m]
                              for w in (tmp_path / "two", tmp_path / "one"))
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    # The evaluation (compiled, then the processes meet, then run) scores the split as one process does.
    two_val, one_val = ([m for m in metrics_writer.read_metrics(w) if any(k.startswith("val/") for k in m)]
                        for w in (tmp_path / "two", tmp_path / "one"))
    assert len(two_val) == len(one_val) == 1
    for key, value in one_val[0].items():
        if key.startswith("val/"):
            np.testing.assert_allclose(two_val[0][key], value, rtol=1e-4, err_msg=key)

    # Only process 0 writes metrics, TensorBoard and the config: one line per step, not two.
    assert [m["step"] for m in metrics_writer.read_metrics(tmp_path / "two") if "train/loss" in m] == list(
        range(1, STEPS + 1))
    assert len(list((tmp_path / "two" / "tb").iterdir())) == 1
    assert not any("unet_phantom:" in line for line in multi.splitlines() if line.startswith("[p1]"))  # no bar
    assert json.loads((tmp_path / "two" / "config.json").read_text())["name"] == "unet_phantom"
    # Both processes take part in the checkpoint: each wrote its array store and its data-iterator position.
    step_dir = tmp_path / "two" / "ckpt" / str(STEPS)
    assert {p.name for p in (step_dir / "state").glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    positions = {p.name: json.loads(p.read_text()) for p in (step_dir / "data").glob("process_*.json")}
    assert set(positions) == {"process_0-of-2.json", "process_1-of-2.json"}


def _init_params(corpus_dir):
    config = load_config(str(REPO / "configs/unet_phantom.py:tiny"))
    model = registry.model_class(config.model_name)(**config.model)
    return model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 32, 32, 1)))["params"]


def test_global_batches_do_not_depend_on_the_host_count(corpus_dir):
    """Host p's batch is slice p of the one global order, with the same per-record random draws."""
    def transform(record, rng):
        return {"key": record["key"], "draw": np.float32(rng.random())}

    def global_batches(hosts, steps=12):
        iters = [iter(pipeline.make_loader(corpus_dir, "train", global_batch_size=8, seed=3, transform=transform,
                                           filter_fn=pipeline.sdm_filter, process_index=p, process_count=hosts))
                 for p in range(hosts)]
        out = []
        for _ in range(steps):  # crosses epoch boundaries (24 images, 3 steps per epoch)
            parts = [next(it) for it in iters]
            out.append(([k for b in parts for k in b["key"]], np.concatenate([b["draw"] for b in parts])))
        return out

    one = global_batches(1)
    assert all(k.endswith("/LV") for keys, _ in one for k in keys)
    for hosts in (2, 4):
        for (keys, draws), (want_keys, want_draws) in zip(global_batches(hosts), one):
            assert keys == want_keys
            np.testing.assert_array_equal(draws, want_draws)


def test_unreachable_coordinator_raises_naming_it_within_the_timeout():
    port = _free_port()  # nobody listens here
    code = ("from jaxboost import parallel\n"
            f"parallel.initialize_distributed('127.0.0.1:{port}', num_processes=2, process_id=1, timeout_s=2)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=60)
    assert time.time() - start < 30
    assert out.returncode == 1, out.stdout[-2000:]
    assert "RuntimeError: could not reach the jax.distributed coordinator '127.0.0.1:" in out.stdout
    assert f":{port}' within 2s as process 1 of 2" in out.stdout
    with pytest.raises(ValueError, match="not HOST:PORT"):
        parallel.initialize_distributed("localhost", num_processes=2, process_id=1, timeout_s=1)


# ------------------------------------------------------------------------------------------- data vs fsdp

def _unet_step(mesh, fsdp_min_size=256):
    """Two SGD steps of a small U-Net (the tiny config's trainer, narrower) on a fixed global batch of 8;
    returns (loss, params on the host, sharded state)."""
    config = load_config(str(REPO / "configs/unet_phantom.py:tiny"))
    # SGD with momentum, not AdamW: the conv biases before GroupNorm get ~1e-9 gradients (the norm cancels
    # them), which Adam's g / sqrt(v) turns into full-size steps of the float-noise sign.
    config.optim = dict(name="sgd", lr=0.1, momentum=0.9, grad_clip=1.0, schedule="constant")
    model = registry.model_class(config.model_name)(**dict(config.model, widths=(8, 16)))
    tx = optim.make_optimizer(config, total_steps=100)

    def init_fn():
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))["params"]
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(1))

    def loss_fn(params, state, batch, rng):
        logits = model.apply({"params": params}, batch["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return ce, ({}, None)

    state, shardings = parallel.create_sharded(init_fn, mesh, fsdp_min_size=fsdp_min_size)
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((8, 16, 16, 1), np.float32), "labels": rng.integers(0, 4, (8, 16, 16), np.int32)}
    step = jax.jit(task_lib.make_train_step(loss_fn, tx), out_shardings=(shardings, None))
    for _ in range(2):  # two steps: the second uses sharded optimiser moments
        state, metrics = step(state, parallel.shard_batch(mesh, batch))
    return float(metrics["loss"]), jax.device_get(state.params), state


@pytest.fixture(scope="module")
def one_device_step():
    loss, params, _ = _unet_step(parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
    return loss, params


@pytest.mark.slow  # ~20-30 s each on 2 shared cores (one U-Net step compile per mesh)
@pytest.mark.parametrize("data,fsdp", [(4, 1), (2, 2), (1, 4)])
def test_data_and_fsdp_meshes_give_the_one_device_step(data, fsdp, one_device_step):
    ref_loss, ref_params = one_device_step
    mesh = parallel.make_mesh(data, fsdp, devices=jax.devices()[:4])
    loss, params, state = _unet_step(mesh)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=parallel._path_str(path))
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0] + \
        jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    split = [parallel._path_str(p) for p, x in leaves
             if hasattr(x, "sharding") and x.sharding.shard_shape(x.shape) != x.shape]
    if fsdp > 1:  # kernels and their momenta really are split over `fsdp`
        assert any("kernel" in s for s in split) and any("trace" in s for s in split), split
        assert parallel.bytes_per_device(state.params, jax.tree.map(lambda x: x.sharding, state.params)) < \
            parallel.bytes_per_device(state.params)
    else:
        assert not split


# ------------------------------------------------------------------------------------------- bad input

def test_mesh_or_batch_that_does_not_divide_names_the_numbers():
    with pytest.raises(ValueError, match=r"data=3 x fsdp=1 = 3 but there are 8 devices"):
        parallel.make_mesh(3)
    with pytest.raises(ValueError, match=r"data=3 does not divide the 8 devices"):
        parallel.make_mesh(3, -1)
    with pytest.raises(ValueError, match=r"fsdp=3 does not divide the 8 devices"):
        parallel.make_mesh(-1, 3)
    with pytest.raises(ValueError, match=r"data=2 x fsdp=2 = 4 but there are 8 devices"):
        parallel.mesh_from_config(ml_collections.ConfigDict({"mesh": {"data": 2, "fsdp": 2}}))
    mesh = parallel.make_mesh(2, 2, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the 4 batch shards .*data=2, fsdp=2"):
        parallel.check_batch_divides(mesh, 6)
    parallel.check_batch_divides(mesh, 8)


def test_a_batch_every_host_holds_becomes_the_same_global_array():
    mesh = parallel.make_mesh(2, 2, devices=jax.devices()[:4])
    batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "key": np.array(["a"] * 8)}
    placed = parallel.shard_global_batch(mesh, batch)
    assert set(placed) == {"image"} and placed["image"].sharding == parallel.batch_sharding(mesh, 2)
    np.testing.assert_array_equal(np.asarray(placed["image"]), batch["image"])

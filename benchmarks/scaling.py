"""Throughput against device count (1/2/4/8): the tiny U-Net train step and the tiny SDM's compiled DDIM
sampler on sub-meshes of the same devices, with the results checked equal across device counts first.

On CPU the "devices" are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8) and share the
machine's cores, so these rows measure the overhead of sharding (partitioned programs, collectives), not
speed-up. On a GPU/TPU host with >= 8 devices the same rows are the scaling curve.

  python -m benchmarks.scaling [--quick]       (or: python -m benchmarks.run --cases scaling)
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEVICE_COUNTS = (1, 2, 4, 8)
NOTE_CPU = "simulated CPU devices share the same cores: sharding overhead, not speed-up"


def _rows_in_subprocess(quick: bool):
    """This process has fewer than 8 devices (jax started without the flag): measure in a child that has them."""
    from benchmarks.harness import Row
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--json"] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"benchmarks.scaling subprocess failed:\n{out.stderr[-3000:]}")
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    return [Row(**r) for r in payload["rows"]], payload["extra"]


def _unet_case(quick: bool, devices):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from benchmarks.harness import Row, time_call
    from jaxboost import parallel, registry
    from jaxboost.config import load_config
    from jaxboost.train import optim, state as state_lib, task as task_lib

    config = load_config(str(CONFIGS / "unet_phantom.py:tiny"))
    size, batch = (32, 8) if quick else (64, 32)
    model = registry.model_class(config.model_name)(**config.model)
    tx = optim.make_optimizer(config, int(config.total_steps))

    def init_fn():
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)))["params"]
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(1))

    def loss_fn(params, state, b, rng):
        logits = model.apply({"params": params}, b["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()
        return ce, ({}, None)

    rng = np.random.default_rng(0)
    host = {"image": rng.random((batch, size, size, 1), np.float32),
            "labels": rng.integers(0, 4, (batch, size, size), np.int32)}
    rows, reference = [], None
    for n in DEVICE_COUNTS:
        mesh = parallel.make_mesh(n, 1, devices=devices[:n])
        state, shardings = parallel.create_sharded(init_fn, mesh)
        step = jax.jit(task_lib.make_train_step(loss_fn, tx), out_shardings=(shardings, None))
        sharded = parallel.shard_batch(mesh, host)
        _, metrics = step(state, sharded)
        got = np.array([float(metrics["loss"]), float(metrics["grad_norm"])])
        reference = got if reference is None else reference
        # loss and gradient norm: the whole step's arithmetic, reduced over the sharded batch
        if not np.allclose(got, reference, rtol=1e-5):
            raise AssertionError(f"U-Net step on {n} devices: (loss, grad_norm) {got} vs 1 device {reference}")
        seconds = time_call(lambda: step(state, sharded), warmup=1, iters=3 if quick else 10)
        rows.append(Row("scaling/unet_train_step", f"jax {n} dev", seconds, batch / seconds,
                        note=f"global batch {batch} at {size}px; loss equal to 1 device"))
    return rows


def _sdm_sampler_case(quick: bool, devices):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from benchmarks.harness import Row, time_call
    from jaxboost import parallel
    from jaxboost.config import load_config
    from jaxboost.diffusion import samplers
    from jaxboost.train import sdm as sdm_trainer

    config = load_config(str(CONFIGS / "sdm.py:tiny"))
    steps, batch = (5, 8) if quick else (int(config.sampler.steps), 16)
    if quick:  # a 32 px tiny model: the loop, not the convolutions, is what is compared
        config.model.image_size = 32
    model = sdm_trainer.build_model(config)
    params = sdm_trainer.init_params(model, config, jax.random.PRNGKey(0))
    size, labels_n = config.model.image_size, config.model.num_labels
    run = samplers.make_sampler(sdm_trainer.apply_fn_for(model), sdm_trainer.make_schedule(config),
                                channels=config.model.in_channels, sampler="ddim", steps=steps,
                                eta=float(config.sampler.eta), guidance=float(config.sampler.guidance))
    rng = np.random.default_rng(0)
    labels = np.asarray(jax.nn.one_hot(rng.integers(0, labels_n, (batch, size, size)), labels_n))
    keys = jax.random.key_data(samplers.per_sample_keys(0, 0, batch))
    rows, reference = [], None
    for n in DEVICE_COUNTS:
        mesh = parallel.make_mesh(n, 1, devices=devices[:n])
        p = jax.device_put(params, parallel.replicated(mesh))
        lab = jax.device_put(labels, parallel.batch_sharding(mesh, labels.ndim))
        k = jax.device_put(keys, NamedSharding(mesh, P(parallel.BATCH_AXES, None)))
        images = np.asarray(run(p, lab, k))
        reference = images if reference is None else reference
        err = float(np.abs(images - reference).max())
        if err > 1e-4:
            raise AssertionError(f"DDIM samples on {n} devices differ from 1 device by {err}")
        seconds = time_call(lambda: run(p, lab, k), warmup=1, iters=2 if quick else 5)
        rows.append(Row("scaling/sdm_ddim_sampler", f"jax {n} dev", seconds, batch / seconds,
                        note=f"{batch} samples, {steps} DDIM steps, guidance, {size}px; max diff to 1 dev {err:.1e}"))
    return rows


def measure(quick: bool):
    import jax
    devices = jax.devices()[:max(DEVICE_COUNTS)]
    rows = _unet_case(quick, devices) + _sdm_sampler_case(quick, devices)
    cpu = jax.default_backend() == "cpu"
    for case in {r.case for r in rows}:
        base = next(r for r in rows if r.case == case and r.impl == "jax 1 dev")
        for r in rows:
            if r.case == case:
                r.note += f"; time vs 1 dev {r.seconds / base.seconds:.2f}x" + (f"; {NOTE_CPU}" if cpu else "")
    return rows, {"device_counts": list(DEVICE_COUNTS), "backend": jax.default_backend()}


def run(quick: bool = False):
    import jax
    if jax.device_count() < max(DEVICE_COUNTS):
        if jax.default_backend() != "cpu":
            raise RuntimeError(f"scaling needs {max(DEVICE_COUNTS)} devices, this host has {jax.device_count()}")
        return _rows_in_subprocess(quick)
    return measure(quick)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print rows as one JSON line (used by run())")
    args = parser.parse_args()
    if "jax" not in sys.modules and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    rows, extra = run(quick=args.quick)
    if args.json:
        print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "extra": extra}))
    else:
        from benchmarks.harness import format_table
        print(format_table(rows))

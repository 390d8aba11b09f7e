"""Full-size configs on an 8-device mesh, without allocating them: parameter counts and the bytes one device
holds for params + AdamW moments, with and without FSDP; and the full SDM train step lowered ahead of time.

  python -m benchmarks.memory            # markdown table (8 simulated CPU devices; nothing is allocated)
  python -m benchmarks.memory --lower    # also AOT-lower the full SDM train step on data=2 x fsdp=4

Everything is `jax.eval_shape` (shapes only) and `parallel.shardings_for` / `parallel.bytes_per_device`,
the rules every trainer uses, so the numbers are what `fit` would place on each device (activations and
XLA temporaries not included).
"""
from __future__ import annotations

import os

if "jax" not in __import__("sys").modules:  # 8 simulated devices when run as a script
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxboost import parallel, registry  # noqa: E402
from jaxboost.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MESHES = ((8, 1), (2, 4), (1, 8))  # (data, fsdp)
MIB = 2 ** 20


# ----------------------------------------------------------------------------------- init per model family
# Each returns (model, init args) for `model.init(rng, *args)` at the config's full size, batch 1.

def _sdm(config):
    m = config.model
    s = m.image_size
    args = (jnp.zeros((1, s, s, m.in_channels)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, s, s, m.num_labels)))
    return registry.model_class(config.model_name)(**m), args


def _vl_seg(config):
    """CLIPSeg / CRIS: image [1, S, S, 3] + token ids [1, context_length]; the tokenizer sets vocab_size 0."""
    m = dict(config.model)
    if not m.get("vocab_size"):
        m["vocab_size"] = int(config.data.get("tokenizer_vocab_size", 49408))
    s, length = int(config.data.size), int(m["context_length"])
    args = (jnp.zeros((1, s, s, 3)), jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))
    return registry.model_class(config.model_name)(**m), args


def _mumc(config):
    m = dict(config.model)
    if not m.get("vocab_size"):
        m["vocab_size"] = int(config.data.get("tokenizer_vocab_size", 30522))
    s = int(m["image_size"])
    image = jnp.zeros((1, s, s, 3))
    if config.trainer == "mumc_vqa":
        from jaxboost.models.mumc import VQAModel
        q, a = int(config.data.max_question_tokens), int(config.data.max_answer_tokens)
        args = (image, jnp.zeros((1, q), jnp.int32), jnp.ones((1, q), jnp.int32),
                jnp.zeros((1, a), jnp.int32), jnp.ones((1, a), jnp.int32))
        return VQAModel(**m), args
    length = int(config.data.get("max_tokens", 25))
    return registry.model_class(config.model_name)(**m), (image, jnp.zeros((1, length), jnp.int32),
                                                          jnp.ones((1, length), jnp.int32))


FAMILIES: dict[str, Callable] = {"sdm": _sdm, "clipseg": _vl_seg, "cris": _vl_seg, "mumc": _mumc}
FULL_CONFIGS = ("sdm.py:full", "clipseg.py:full", "cris.py:full", "mumc_pretrain.py:full", "mumc_vqa.py:full")


@dataclasses.dataclass
class MemoryRow:
    config: str
    params: int                       # parameter count
    param_mib: float                  # whole parameter tree (its stored dtype)
    per_device_mib: dict              # "data=8" -> MiB of params + AdamW mu, nu on one device
    seconds: float                    # eval_shape + sharding time
    error: str = ""


def abstract_params(spec: str):
    config = load_config(str(CONFIGS / spec))
    family = FAMILIES.get(config.model_name)
    if family is None:
        raise ValueError(f"{spec}: no init recipe for model_name={config.model_name!r} (known: {list(FAMILIES)})")
    model, args = family(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args)["params"])


def measure(spec: str, devices=None) -> MemoryRow:
    t0 = time.perf_counter()
    params = abstract_params(spec)
    opt_state = jax.eval_shape(optax.adamw(1e-4).init, params)
    tree = {"params": params, "opt_state": opt_state}
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    per_device = {}
    for data, fsdp in MESHES:
        mesh = parallel.make_mesh(data, fsdp, devices=devices)
        per_device[f"data={data},fsdp={fsdp}"] = parallel.bytes_per_device(tree, parallel.shardings_for(tree, mesh)) / MIB
    return MemoryRow(spec, count, parallel.bytes_per_device(params) / MIB, per_device, time.perf_counter() - t0)


def available_full_configs() -> list[str]:
    return [s for s in FULL_CONFIGS if (CONFIGS / s.split(":")[0]).exists()]


def table(rows: list[MemoryRow]) -> str:
    meshes = [f"data={d},fsdp={f}" for d, f in MESHES]
    lines = ["| config | parameters | params MiB | " + " | ".join(f"params+AdamW MiB/device, {m}" for m in meshes)
             + " |", "|" + "---|" * (3 + len(meshes))]
    for r in rows:
        if r.error:
            lines.append(f"| {r.config} | model did not build: {r.error} |" + " |" * (1 + len(meshes)))
            continue
        lines.append(f"| {r.config} | {r.params:,} | {r.param_mib:,.1f} | "
                     + " | ".join(f"{r.per_device_mib[m]:,.1f}" for m in meshes) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- AOT: the SDM train step

def lower_sdm_train_step(data: int = 2, fsdp: int = 4, batch_size: int | None = None, spec: str = "sdm.py:full"):
    """Lowers (no compile) the full SDM train step — diffusion loss forward + backward, AdamW, EMA — for a
    data x fsdp mesh with every input abstract and sharded as `fit` shards it. Returns (lowered, info)."""
    from jaxboost.train import optim, task as task_lib
    from jaxboost.train import sdm as sdm_trainer
    config = load_config(str(CONFIGS / spec))
    mesh = parallel.make_mesh(data, fsdp)
    batch_size = batch_size or int(config.batch_size)
    parallel.check_batch_divides(mesh, batch_size)
    model = sdm_trainer.build_model(config)
    tx = optim.make_optimizer(config, int(config.total_steps))
    abstract = jax.eval_shape(sdm_trainer.make_init_fn(model, config, tx))
    shardings = parallel.shardings_for(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    s, c = config.model.image_size, config.model.in_channels
    batch = {"image": jax.ShapeDtypeStruct((batch_size, s, s, c), jnp.float32,
                                           sharding=parallel.batch_sharding(mesh, 4)),
             "labels": jax.ShapeDtypeStruct((batch_size, s, s), jnp.int32, sharding=parallel.batch_sharding(mesh, 3))}
    step_fn = task_lib.make_train_step(sdm_trainer.make_loss_fn(model, config, sdm_trainer.make_schedule(config)), tx,
                                       sdm_trainer.ema_post_update(float(config.ema_decay)))
    t0 = time.perf_counter()
    lowered = jax.jit(step_fn, out_shardings=(shardings, None), donate_argnums=(0,)).lower(state, batch)
    split = sum(1 for sh in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
                if "fsdp" in str(sh.spec))
    info = {"mesh": f"data={data},fsdp={fsdp}", "batch": batch_size, "lower_s": time.perf_counter() - t0,
            "state_leaves": len(jax.tree.leaves(abstract)), "fsdp_split_leaves": split,
            "state_mib_per_device": parallel.bytes_per_device(abstract, shardings) / MIB}
    return lowered, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lower", action="store_true", help="also AOT-lower the full SDM train step")
    args = parser.parse_args(argv)
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got "
                         f"{jax.device_count()}")
    devices = jax.devices()[:8]
    rows = []
    for spec in available_full_configs():
        try:
            rows.append(measure(spec, devices))
        except Exception as e:  # noqa: BLE001 — a config still being written is reported, not fatal
            rows.append(MemoryRow(spec, 0, 0.0, {}, 0.0, error=f"{type(e).__name__}: {str(e)[:120]}"))
    print(table(rows))
    print("\nparams + AdamW = params and both moments (mu, nu) in float32; FSDP splits each leaf of >= 16384 "
          "elements on its largest dimension divisible by fsdp; activations are not included.")
    if args.lower:
        lowered, info = lower_sdm_train_step()
        text = lowered.as_text()
        print(f"\nSDM full train step lowered for {info['mesh']} (batch {info['batch']}) in {info['lower_s']:.1f} s: "
              f"{info['fsdp_split_leaves']} of {info['state_leaves']} state leaves split over fsdp, "
              f"{info['state_mib_per_device']:,.1f} MiB of TrainState (params, AdamW, EMA) per device, "
              f"StableHLO {len(text) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

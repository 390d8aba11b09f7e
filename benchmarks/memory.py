"""Full-size configs on simulated meshes, without allocating them.

  python -m benchmarks.memory                          # params + AdamW bytes per device, with and without FSDP
  python -m benchmarks.memory --json OUT [--configs sdm.py:full,...] [--devices 8,16] [--microbatches K]
  python -m benchmarks.memory --table OUT [OUT2 ...]     # the table of rows already written
      AOT-compiles each full config's production train step (and the SDM sampler) for 8 devices (the
      config's own mesh) and 16 devices (data=1 x fsdp=16) at the paper batch and writes a JSON list of rows
      {config, step, devices, mesh, batch, peak_bytes_per_device, params/optimizer/ema/extra bytes, ...};
      rows already in OUT for other (config, step, devices) are kept, so configs can be compiled one at a time.

The shape-only numbers are `jax.eval_shape` and `parallel.shardings_for` / `parallel.bytes_per_device`, the
rules every trainer uses. The peak is `compiled.memory_analysis()` of the step XLA would run on each device
(arguments + outputs - donated aliases + temporaries); compiled by XLA:CPU for simulated devices, so it is
CPU's buffer assignment of the GPU/TPU-size program (close, not identical: fusion and layouts differ).
"""
from __future__ import annotations

import os

if "jax" not in __import__("sys").modules:  # 8 simulated devices when run as a script
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxboost import parallel, registry  # noqa: E402
from jaxboost.config import load_config  # noqa: E402
from jaxboost.models import layers  # noqa: E402
from jaxboost.registry import Registry  # noqa: E402

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



# ----------------------------------------------------------------------------------- AOT: production steps

GB = 10 ** 9
# Per-device memory the full configs must fit: an 8-GPU node of 80 GB (A100/H100), and 16 chips of 16 GB
# (TPU v4/v5e) with the parameters split over fsdp.
BUDGETS = {8: 80 * GB, 16: 16 * GB}
SAMPLER_PER_DEVICE_BATCH = 4    # jaxboost synth's default (synth.DEFAULT_PER_DEVICE_BATCH)
TOKENIZER_TEXTS = ["the left ventricle of the heart in a two chamber view",
                   "myocardium of the left ventricle, end diastole", "left atrium in a four chamber view"]


@dataclasses.dataclass
class ProductionStep:
    """What a trainer's Task hands to `loop.fit`: its loss, post-update and state, one example's fields."""
    loss_fn: Callable             # (params, state, batch, rng) -> (loss, (metrics, aux))
    post_update: Callable | None  # (old state, new state, aux) -> (state, metrics): EMA, momentum, BN stats
    tx: Any                       # the optax optimiser
    abstract_state: Any           # TrainState of ShapeDtypeStructs
    example: dict                 # field -> (shape of one example, dtype)
    microbatches: int = 1         # config.microbatches: gradient accumulation over micro-batches

    @property
    def step_fn(self):
        from jaxboost.train import task as task_lib
        return task_lib.make_train_step(self.loss_fn, self.tx, self.post_update, self.microbatches)


# By trainer name. Each builds the Task's pieces as that trainer's `make_task` does, without its data
# (make_task needs a corpus / VQA folder): when the trainers change, these few lines are what to re-point.
STEP_BUILDERS = Registry("production step")
SCHEDULE_STEPS = 1000   # steps per epoch and run length for the schedules: they change no buffer


@STEP_BUILDERS.register("sdm")
def _sdm_step(config, workdir: Path) -> ProductionStep:
    from jaxboost.train import optim
    from jaxboost.train import sdm as trainer
    model = trainer.build_model(config)
    tx = optim.make_optimizer(config, int(config.total_steps))
    s, c = int(config.model.image_size), int(config.model.in_channels)
    return ProductionStep(trainer.make_loss_fn(model, config, trainer.make_schedule(config)),
                          trainer.ema_post_update(float(config.ema_decay)), tx,
                          jax.eval_shape(trainer.make_init_fn(model, config, tx)),
                          {"image": ((s, s, c), jnp.float32), "labels": ((s, s), jnp.int32)})


@STEP_BUILDERS.register("vl_seg")
def _vl_seg_step(config, workdir: Path) -> ProductionStep:
    from jaxboost.data.tokenize_clip import ClipTokenizer
    from jaxboost.train import optim, state as state_lib, task as task_lib, vl_seg
    folder = workdir / vl_seg.TOKENIZER_DIR
    tokenizer = ClipTokenizer.train(TOKENIZER_TEXTS, str(folder), 300, int(config.model.context_length))
    model = vl_seg.build_model(config, tokenizer)
    frozen, lr_mults = vl_seg.encoder_groups(config)
    tx = optim.make_optimizer(config, SCHEDULE_STEPS, SCHEDULE_STEPS, frozen=frozen, lr_mults=lr_mults)

    def init_state(variables):
        stats = {k: v for k, v in variables.items() if k != "params"}
        return state_lib.initial_state(variables["params"], tx, int(config.seed) + 1, extra=stats or None)
    state = jax.eval_shape(init_state, vl_seg.variable_shapes(config, model))
    s, length = int(config.data.size), int(model.context_length)
    return ProductionStep(vl_seg.make_loss_fn(config, model), task_lib.keep_model_state, tx, state,
                          {"image": ((s, s, 3), jnp.float32), "mask": ((s, s), jnp.float32),
                           "input_ids": ((length,), jnp.int32), "attention_mask": ((length,), jnp.int32)})


def _mumc_tokenizer(config, workdir: Path):
    from jaxboost.data.tokenize_bert import BertTokenizer
    return BertTokenizer.train(TOKENIZER_TEXTS, str(workdir / "tokenizer"), 200)


@STEP_BUILDERS.register("mumc_pretrain")
def _mumc_pretrain_step(config, workdir: Path) -> ProductionStep:
    from jaxboost.train import mumc_pretrain as trainer
    from jaxboost.train import optim
    tokenizer = _mumc_tokenizer(config, workdir)
    model = trainer.build_model(config, tokenizer.vocab_size)
    tx = optim.make_optimizer(config, SCHEDULE_STEPS, SCHEDULE_STEPS)
    s, length = int(config.model.image_size), int(config.data.max_tokens)
    return ProductionStep(trainer.make_loss_fn(config, model, tokenizer, SCHEDULE_STEPS),
                          trainer.momentum_post_update(config), tx, jax.eval_shape(trainer.make_init_fn(config, model, tx)),
                          {"images": ((s, s, 3), jnp.float32), "input_ids": ((length,), jnp.int32),
                           "mask": ((length,), jnp.int32)})


@STEP_BUILDERS.register("mumc_vqa")
def _mumc_vqa_step(config, workdir: Path) -> ProductionStep:
    from jaxboost.train import mumc_vqa as trainer
    from jaxboost.train import optim
    tokenizer = _mumc_tokenizer(config, workdir)
    model = trainer.build_model(config, tokenizer.vocab_size)
    tx = optim.make_optimizer(config, SCHEDULE_STEPS, SCHEDULE_STEPS)
    init_fn = trainer._state_fn(tx, lambda: (trainer.fresh_params(config, model), None), config.seed)
    s, q, a = int(config.model.image_size), int(config.data.max_question_tokens), int(config.data.max_answer_tokens)
    return ProductionStep(trainer.make_loss_fn(config, model, SCHEDULE_STEPS), trainer.momentum_post_update(config),
                          tx, jax.eval_shape(init_fn),
                          {"images": ((s, s, 3), jnp.float32), "question_ids": ((q,), jnp.int32),
                           "question_mask": ((q,), jnp.int32), "answer_ids": ((a,), jnp.int32),
                           "answer_mask": ((a,), jnp.int32)})


def saved_activation_bytes(step: ProductionStep, per_device_batch: int) -> int:
    """Bytes the loss's backward pass keeps from its forward pass for one device's share of the batch, the
    inputs themselves left out: what remat trades for recomputation (XLA:CPU's buffer assignment does not
    show it: its peak is the same with and without remat, so the rows carry this figure beside it)."""
    # jax.ad_checkpoint.print_saved_residuals prints this list; the function returning it is not exported.
    from jax._src.ad_checkpoint import saved_residuals
    batch = {k: jax.ShapeDtypeStruct((per_device_batch,) + tuple(shape), dtype)
             for k, (shape, dtype) in step.example.items()}
    state = step.abstract_state
    residuals = saved_residuals(lambda p, b, st: step.loss_fn(p, st, b, st.rng)[0], state.params, batch, state)
    return sum(int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize for aval, where in residuals
               if not where.startswith("from the argument"))


def sharded_abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_batch(example: dict, batch_size: int, mesh) -> dict:
    return {k: jax.ShapeDtypeStruct((batch_size,) + tuple(shape), dtype,
                                    sharding=parallel.batch_sharding(mesh, 1 + len(shape)))
            for k, (shape, dtype) in example.items()}


def lower_train_step(config, mesh, batch_size: int):
    """The production train step lowered (not compiled) for `mesh` with every input abstract and sharded as
    `loop.fit` shards it (state donated). Returns (lowered, the ProductionStep, state shardings)."""
    with tempfile.TemporaryDirectory(prefix="jaxboost-memory-") as tmp:
        step = STEP_BUILDERS.get(config.trainer)(config, Path(tmp))
    step.microbatches = int(config.get("microbatches", 1) or 1)
    shardings = parallel.shardings_for(step.abstract_state, mesh)
    jitted = jax.jit(step.step_fn, out_shardings=(shardings, None), donate_argnums=(0,))
    lowered = jitted.lower(sharded_abstract(step.abstract_state, shardings),
                           abstract_batch(step.example, batch_size, mesh))
    return lowered, step, shardings


def lower_sampler(config, mesh, batch_size: int):
    """synth's sampler program (guided DDIM/DDPM over the EMA params) lowered for `mesh`."""
    from jaxboost.diffusion import samplers
    from jaxboost.train import sdm as sdm_train
    model = sdm_train.build_model(config)
    dtype = config.sampler.get("dtype", "float32")
    run = samplers.make_sampler(sdm_train.apply_fn_for(model), sdm_train.make_schedule(config),
                                channels=int(config.model.in_channels), sampler=config.sampler.name,
                                steps=int(config.sampler.steps), eta=float(config.sampler.eta),
                                guidance=config.sampler.get("guidance", None),
                                dtype=None if dtype == "float32" else jnp.dtype(dtype))
    num_labels = int(config.model.num_labels)
    params = jax.eval_shape(lambda: sdm_train.init_params(model, config, jax.random.PRNGKey(0)))
    shardings = parallel.shardings_for(params, mesh)
    s = int(config.model.image_size)
    inputs = abstract_batch({"labels": ((s, s), jnp.int32), "keys": ((2,), jnp.uint32)}, batch_size, mesh)
    fn = jax.jit(lambda p, labels, keys: run(p, sdm_train.one_hot_labels(labels, num_labels), keys))
    return fn.lower(sharded_abstract(params, shardings), inputs["labels"], inputs["keys"]), params, shardings


def _state_bytes(abstract_state, shardings) -> dict:
    """Bytes per device of each part of a TrainState (params, optimizer, ema, extra: momentum/queues/BN)."""
    parts = {"params": "params", "optimizer": "opt_state", "ema": "ema_params", "extra": "extra"}
    return {f"{name}_bytes": (parallel.bytes_per_device(getattr(abstract_state, field), getattr(shardings, field))
                              if getattr(abstract_state, field) is not None else 0)
            for name, field in parts.items()}


def peak_bytes(compiled) -> dict:
    """Per-device figures of XLA's buffer assignment: peak = arguments + outputs - aliased (donated) +
    temporaries, everything live at once (XLA:CPU's own `peak_memory_in_bytes` leaves the temporaries out;
    it is kept as `xla_peak_bytes`)."""
    m = compiled.memory_analysis()
    figures = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
               "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
               "xla_peak_bytes": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}
    figures["peak_bytes_per_device"] = (figures["argument_bytes"] + figures["output_bytes"]
                                        - figures["alias_bytes"] + figures["temp_bytes"])
    return figures


def mesh_for(config, devices: list) -> tuple[int, int]:
    """(data, fsdp): the config's own mesh on 8 devices; every parameter split over 16 devices."""
    if len(devices) == 16:
        return 1, 16
    m = config.get("mesh", None) or {}
    return int(m.get("data", -1)), int(m.get("fsdp", 1))


def _remat_field(config) -> str:
    """The config's remat field: `remat_policy` (SDM, CLIPSeg, CRIS) or MUMC's `remat` (a policy name)."""
    return "remat_policy" if "remat_policy" in config.model else "remat"


def _load(spec: str, overrides: dict | None):
    """The config with `overrides` set: model fields, or top-level ones the config has (batch_size,
    microbatches)."""
    config = load_config(str(CONFIGS / spec))
    for key, value in (overrides or {}).items():
        if key in config and key not in config.model:
            config[key] = value
        else:
            config.model[key] = value
    return config


def compile_row(spec: str, devices: list, step: str = "train", overrides: dict | None = None) -> dict:
    """One JSON row: `spec`'s train step (or the SDM sampler) compiled for `devices` at its paper batch.

    peak_bytes_per_device is XLA:CPU's; it keeps every activation whatever the remat policy, so for a
    rematerialised step `estimated_peak_bytes` is `estimated_peak(row)` and `fits` is judged on it."""
    config = _load(spec, overrides)
    data, fsdp = mesh_for(config, devices)
    mesh = parallel.make_mesh(data, fsdp, devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = int(config.batch_size) if step == "train" else SAMPLER_PER_DEVICE_BATCH * shards
    policy = layers.remat_policy_name(config.model.get(_remat_field(config), "none"))
    micro = int(config.get("microbatches", 1) or 1) if step == "train" else 1
    t0 = time.perf_counter()
    row = {"config": spec, "step": step, "devices": len(devices), "batch": batch, "per_device_batch": batch // shards,
           "microbatches": micro,
           "mesh": f"data={mesh.shape['data']},fsdp={mesh.shape['fsdp']}", "remat_policy": policy}
    if step == "train":
        lowered, production, shardings = lower_train_step(config, mesh, batch)
        row.update(**peak_bytes(lowered.compile()), **_state_bytes(production.abstract_state, shardings))
        # per micro-batch: the scan runs each micro-batch's forward and backward in turn
        row["saved_activation_bytes"] = saved_activation_bytes(production, batch // shards // micro)
        without = row["saved_activation_bytes"]
        if policy != "none":
            with tempfile.TemporaryDirectory(prefix="jaxboost-memory-") as tmp:
                plain = STEP_BUILDERS.get(config.trainer)(_load(spec, {**(overrides or {}),
                                                                       _remat_field(config): "none"}), Path(tmp))
            without = saved_activation_bytes(plain, batch // shards // micro)
        row["saved_activation_bytes_without_remat"] = without
        row["estimated_peak_bytes"] = estimated_peak(row)
    else:
        lowered, params, shardings = lower_sampler(config, mesh, batch)
        row.update(**peak_bytes(lowered.compile()), params_bytes=parallel.bytes_per_device(params, shardings),
                   optimizer_bytes=0, ema_bytes=0, extra_bytes=0, saved_activation_bytes=0,
                   saved_activation_bytes_without_remat=0)
        row["estimated_peak_bytes"] = row["peak_bytes_per_device"]
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row["budget_bytes"] = BUDGETS.get(len(devices))
    row["fits"] = None if row["budget_bytes"] is None else row["estimated_peak_bytes"] <= row["budget_bytes"]
    return row


def estimated_peak(row: dict) -> int:
    """A train row's peak with its remat policy honoured: XLA:CPU's peak less the activations remat does not
    keep (saved residuals without remat minus with it), but never below what is live when the backward
    pass starts: the persistent buffers (arguments + outputs - donated aliases: state, batch, new state),
    the residuals remat keeps and the gradients (one float32 copy of the params). XLA's fusions already
    drop some residuals jax lists (the full SDM: XLA:CPU's whole peak, 112 GB, is below its 119 GB of
    listed residuals), so the subtraction alone can fall below the state itself."""
    if row["remat_policy"] == "none":
        return row["peak_bytes_per_device"]
    dropped = row["saved_activation_bytes_without_remat"] - row["saved_activation_bytes"]
    live = (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["saved_activation_bytes"]
            + row["params_bytes"] * (2 if row.get("microbatches", 1) > 1 else 1))
    return max(row["peak_bytes_per_device"] - dropped, live)


def _row_key(row: dict) -> tuple:
    return row["config"], row["step"], row["devices"], row.get("remat_policy"), row.get("microbatches", 1)


def write_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Merges `rows` into the JSON list at `path` (same config/step/devices/remat replaced), atomically."""
    old = json.loads(path.read_text()) if path.exists() else []
    merged = {_row_key(r): r for r in old}
    merged.update({_row_key(r): r for r in rows})
    out = sorted(merged.values(), key=lambda r: (r["config"], r["step"], r["devices"]))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    return out


def _batch_cell(row: dict) -> str:
    k = row.get("microbatches", 1)
    return f"{row['batch']}" if k == 1 else f"{row['batch']} ({k} x {row['batch'] // k})"


def peak_table(rows: list[dict]) -> str:
    lines = ["| config | step | devices | mesh | batch | remat | XLA:CPU peak GB/device | saved activations GB "
             "(no remat) | est. peak GB/device | params+opt+EMA GB/device | fits |", "|---|" * 1 + "---|" * 10]
    for r in rows:
        if r["step"] == "train":   # rows written before the estimate changed are re-judged on the current one
            r = dict(r, estimated_peak_bytes=estimated_peak(r))
            r["fits"] = None if r["budget_bytes"] is None else r["estimated_peak_bytes"] <= r["budget_bytes"]
        state = (r["params_bytes"] + r["optimizer_bytes"] + r["ema_bytes"] + r["extra_bytes"]) / GB
        fits = "" if r["fits"] is None else f"yes (<= {r['budget_bytes'] / GB:.0f})" if r["fits"] else "NO"
        lines.append(f"| {r['config']} | {r['step']} | {r['devices']} | {r['mesh']} | {_batch_cell(r)} | "
                     f"{r['remat_policy']} | {r['peak_bytes_per_device'] / GB:.2f} | "
                     f"{r['saved_activation_bytes'] / GB:.2f} ({r['saved_activation_bytes_without_remat'] / GB:.2f}) | "
                     f"{r['estimated_peak_bytes'] / GB:.2f} | {state:.2f} | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="AOT-compile the production steps and write/merge rows here")
    parser.add_argument("--configs", default=",".join(FULL_CONFIGS), help="comma-separated CONFIG.py:VARIANT")
    parser.add_argument("--devices", default="8,16", help="simulated device counts to compile for")
    parser.add_argument("--no-sampler", action="store_true", help="skip the SDM sampler rows")
    parser.add_argument("--microbatches", type=int, default=0,
                        help="compile the train steps with this config.microbatches (0: the config's own)")
    parser.add_argument("--table", type=Path, nargs="+", help="print the table of these JSON files and exit")
    args = parser.parse_args(argv)
    if args.table:
        rows = [r for path in args.table for r in json.loads(path.read_text())]
        print(peak_table(sorted(rows, key=lambda r: (r["config"], r["step"], r["devices"]))))
        return 0
    counts = [int(n) for n in args.devices.split(",") if n]
    need = max(counts + [8])
    if jax.device_count() < need:
        raise SystemExit(f"needs {need} devices (XLA_FLAGS=--xla_force_host_platform_device_count={need}), got "
                         f"{jax.device_count()}")
    specs = [s for s in args.configs.split(",") if s]
    if args.json is None:
        print(table([measure(spec, jax.devices()[:8]) for spec in specs]))
        print("\nparams + AdamW = params and both moments (mu, nu) in float32; FSDP splits each leaf of >= 16384 "
              "elements on its largest dimension divisible by fsdp; activations are not included.")
        return 0
    for spec in specs:
        steps = ["train"] + (["sampler"] if spec.startswith("sdm.py") and not args.no_sampler else [])
        for step in steps:
            for n in counts:
                overrides = {"microbatches": args.microbatches} if args.microbatches and step == "train" else None
                row = compile_row(spec, jax.devices()[:n], step, overrides)
                rows = write_rows(args.json, [row])
                print(peak_table([row]).splitlines()[-1], flush=True)
    print(peak_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""SDM train step and the whole DDIM sampling loop: jaxboost (jit, one fori_loop) vs the PyTorch reference
(benchmarks/torch_ref/sdm_unet.py; eager, and torch.compile where it works), same weights through the
converter, same batch, same timesteps and noise. Loss: MSE + lambda * VLB (learned-range variance), AdamW.
Both run on the device and in the precision of `harness.setting()` (bf16: the U-Net's convolutions and
matmuls, the loss and the sampler's arithmetic in float32; the reference's attention through
scaled_dot_product_attention off the float32 CPU default, ours through cuDNN for bf16 on a GPU). Outputs are
checked equal first (loss, sampled images), to the dtype's tolerance.

  python -m benchmarks.speed_sdm [--quick]
  python -m benchmarks.speed_sdm --part jax --out DIR --train-only --iters 2 [--conv-impl NAME]
--conv-impl times the JAX side under another `layers.CONV_IMPLS` form (what the model's conv_impl "auto" runs
on this backend, layers.AUTO_CONV); its row's note names the form.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from benchmarks import harness
from benchmarks.harness import Row

VLB_WEIGHT = 0.001


def _fields(quick: bool, setting: harness.Setting | None = None) -> tuple[dict, int, int]:
    """(model fields, train batch, sampler steps) in the Setting's dtype (cuDNN attention for bf16 on a GPU).
    Full: configs/sdm.py:full's model (echo_from_noise's SDM at 256 px, 652 M parameters, SPADE hidden 128,
    each block rematerialised as the trainer runs it, the torch reference with guided-diffusion's per-block
    checkpointing to match). On a CPU batch 1 at FULL_CPU_SIZE px (below; AdamW state alone is 10 GiB)
    and the guided DDIM loop at 5 steps (10 model calls of ~0.5 TFLOP each), timed once after the call
    that is checked; on a GPU batch 4 and the config's 50 steps (a guided DDIM-50 loop of 4 samples is ~1.4
    PFLOP: 4.6 s at 30% of an H100's bf16 peak; benchmarks/device_check.sh's budget)."""
    setting = setting or harness.setting()
    precision = dict(dtype=setting.dtype,
                     attention_implementation="cudnn" if setting.bf16 and setting.device == "gpu" else None)
    if quick or os.environ.get("BENCH_SDM_FULL_AS_QUICK"):  # the latter: the full-size path at quick size (tests)
        return dict(image_size=32, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(16,), num_head_channels=32, num_labels=5, learn_sigma=True,
                    dropout=0.0, use_scale_shift_norm=True, resblock_updown=True, **precision), 4, 5
    from jaxboost.config import load_config
    config = load_config("configs/sdm.py:full")
    fields = {**dict(config.model), **precision}
    if setting.device == "gpu":
        return fields, 4, int(config.sampler.steps)
    return full_at_size(fields, os.environ.get("BENCH_SDM_SIZE") or FULL_CPU_SIZE), 1, 5


# The full SDM's image size on a CPU. At 256 px XLA:CPU's train step needs 24.8 GiB at batch 1 (9.7 GiB of
# state + 15.1 GiB of temporaries, `compiled.memory_analysis()`; its buffer assignment keeps the activations
# whatever the remat policy), more than a 24 GiB machine holds, while the torch reference fits in 12.3 GB.
# At 128 px the same network (same 652 M parameters, attention at the same levels) fits; BENCH_SDM_SIZE=256
# measures the paper's size on a machine with the memory.
FULL_CPU_SIZE = 128


def full_at_size(fields: dict, size) -> dict:
    """The full SDM's fields at `size` px (an int, or BENCH_SDM_SIZE's text) with the same network:
    attention_resolutions are feature sizes in pixels, so they scale with the image to keep attention at the
    same U-Net levels (and parameters)."""
    base = int(fields["image_size"])
    try:
        size = int(size)
    except ValueError:
        raise ValueError(f"BENCH_SDM_SIZE={size!r}: give the image size in pixels, a multiple of 32") from None
    if size == base:
        return fields
    if size % 32 or size <= 0:
        raise ValueError(f"BENCH_SDM_SIZE={size}: the full SDM needs a multiple of 32 px (it downsamples 32x)")
    return {**fields, "image_size": size,
            "attention_resolutions": tuple(r * size // base for r in fields["attention_resolutions"])}


# Float32 copies of the parameters each side holds while training: JAX params, gradients, AdamW's two moments
# and the EMA (plus the converted copy's source while converting); torch params, gradients and two moments.
PARAM_COPIES = {"jax": 6, "torch eager": 4, "torch compile": 4, "both": 9}


def check_memory(fields: dict, batch: int, part: str = "both") -> None:
    """Refuse, naming what is needed, a size this machine cannot hold: the parameter copies of `part`
    (PARAM_COPIES) and the saved activations (without checkpointing the torch reference keeps every block's,
    ~19 GiB per 256 px sample in float32; with per-block remat / checkpointing ~2 GiB)."""
    import jax

    from jaxboost.models.sdm import Model
    size, c = fields["image_size"], fields["in_channels"]
    shapes = jax.eval_shape(lambda: Model(**fields).init(jax.random.key(0), jnp.zeros((1, size, size, c)),
                                                         jnp.zeros((1,), jnp.int32),
                                                         jnp.zeros((1, size, size, fields["num_labels"]))))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    per_sample = (2 if fields.get("remat_policy", "none") != "none" else 19) * 2 ** 30
    need = 4 * params * PARAM_COPIES[part] + batch * per_sample * (size / 256) ** 2 * (fields["model_channels"] / 256)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > available and harness.setting().device == "cpu":  # on a GPU the host holds one copy at most
        raise MemoryError(f"SDM {size}px b{batch} ({params / 1e6:.0f} M parameters, {part}): needs "
                          f"~{need / 2 ** 30:.0f} GiB, {available / 2 ** 30:.0f} GiB available")


def _torch_loss(model, diffusion_tables, x0, t, noise, y, autocast=contextlib.nullcontext):
    """improved-diffusion's MSE + lambda * VB (KL branch; t >= 1 here) in torch, float32; the model runs
    under `autocast()` (Setting.autocast)."""
    import torch
    sqrt_acp, sqrt_1macp, coef1, coef2, post_logvar, log_betas = diffusion_tables
    g = lambda a: a[t].view(-1, 1, 1, 1)
    x_t = g(sqrt_acp) * x0 + g(sqrt_1macp) * noise
    with autocast():
        out = model(x_t, t, y)
    out = out.float()
    c = x0.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    frozen = eps.detach()
    pred_x0 = (x_t - g(sqrt_1macp) * frozen) / g(sqrt_acp)
    mean = g(coef1) * pred_x0 + g(coef2) * x_t
    frac = (v + 1) / 2
    logvar = frac * g(log_betas) + (1 - frac) * g(post_logvar)
    true_mean = g(coef1) * x0 + g(coef2) * x_t
    true_logvar = g(post_logvar)
    kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                + (true_mean - mean) ** 2 * torch.exp(-logvar))
    vb = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    return (mse + VLB_WEIGHT * vb).mean()


def _product_step_fn(fields: dict):
    """(step, make_state) of `jaxboost train configs/sdm.py` for these model fields: the SDM trainer's loss
    (MSE + lambda VLB, label dropout) and EMA post-update; AdamW at the reference's lr, no weight decay."""
    from jaxboost.config import load_config
    from jaxboost.train import optim, sdm as sdm_train, task as task_lib
    from jaxboost.train.state import initial_state
    config = load_config("configs/sdm.py:tiny", ["optim.lr=1e-4", "optim.weight_decay=0.0",
                                                 f"diffusion.vlb_weight={VLB_WEIGHT}"])
    config.model = ConfigDict(fields)
    tx = optim.make_optimizer(config, 1000)
    model = sdm_train.build_model(config)
    step = task_lib.make_train_step(sdm_train.make_loss_fn(model, config, sdm_train.make_schedule(config)), tx,
                                    sdm_train.ema_post_update(float(config.ema_decay)))
    return step, lambda params: initial_state(params, tx, 0, ema=True)


def _product_step(fields: dict, params, x0, labels):
    """(step, state, batch) of the SDM trainer's step (`_product_step_fn`) on these weights and batch."""
    step, make_state = _product_step_fn(fields)
    return step, make_state(params), {"image": jnp.asarray(x0),
                                      "labels": jnp.asarray(np.argmax(labels, -1).astype(np.int32))}


def check_step_memory(fields: dict, batch: int) -> float:
    """XLA's own figure for the train step, before anything is allocated: the step compiled from shapes
    (arguments + outputs - donated aliases + temporaries, `compiled.memory_analysis()`); refuses, naming the
    need and BENCH_SDM_SIZE, when this machine's free memory is less. Returns the peak in bytes."""
    from jaxboost.models.sdm import Model
    step, make_state = _product_step_fn(fields)
    size, c = fields["image_size"], fields["in_channels"]
    params = jax.eval_shape(lambda: Model(**fields).init(jax.random.key(0), jnp.zeros((1, size, size, c)),
                                                         jnp.zeros((1,), jnp.int32),
                                                         jnp.zeros((1, size, size, fields["num_labels"]))))["params"]
    state = jax.eval_shape(make_state, params)
    images = {"image": jax.ShapeDtypeStruct((batch, size, size, c), jnp.float32),
              "labels": jax.ShapeDtypeStruct((batch, size, size), jnp.int32)}
    m = jax.jit(step, donate_argnums=(0,)).lower(state, images).compile().memory_analysis()
    if m is None:   # a backend without the analysis: nothing to check against
        return float("nan")
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if peak > available and harness.setting().device == "cpu":
        raise MemoryError(f"SDM train step {size}px b{batch}: XLA needs {peak / 2 ** 30:.1f} GiB "
                          f"({m.temp_size_in_bytes / 2 ** 30:.1f} GiB of it temporaries), "
                          f"{available / 2 ** 30:.1f} GiB free; set BENCH_SDM_SIZE to a smaller multiple of 32")
    return float(peak)


def _setup(quick: bool, part: str = "both") -> dict:
    """The torch reference with non-trivial weights, the same weights converted, one batch, and the losses of
    the sides `part` names ("both", "jax", "torch eager", "torch compile"); with both they are checked equal
    here, before anything is timed. A "jax" part keeps no torch model (it is dropped after converting), a
    torch part no JAX parameters: the full SDM is built once per process."""
    import gc

    import torch

    from benchmarks.torch_ref.sdm_unet import unet_from_config, use_checkpoint
    from jaxboost.convert.sdm import sdm_from_torch_state_dict
    from jaxboost.diffusion import losses, schedules
    from jaxboost.models.sdm import Model
    from jaxboost.train import sdm as sdm_train

    torch.manual_seed(0)
    setting = harness.setting()
    fields, batch, steps = _fields(quick, setting)
    check_memory(fields, batch, part)
    cfg = ConfigDict(fields)
    ref = use_checkpoint(unet_from_config(cfg), fields.get("remat_policy", "none") != "none")
    # Non-zero output layers so outputs and gradients are not trivially equal.
    for name, p in ref.named_parameters():
        if p.abs().sum() == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    params = None
    if part in ("both", "jax"):
        params = sdm_from_torch_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()}, cfg)
        # Device arrays, and the numpy copy dropped: the train step donates its state, which a numpy leaf
        # cannot be (at 256 px a second copy of every parameter is 2.6 GB the 24 GiB machine lacks).
        params = jax.tree.map(jnp.array, params)
    if part == "jax":
        ref = None
        gc.collect()
    else:
        harness.torch_attention(ref, setting.torch_sdpa).to(setting.torch_device)
    model = Model(**fields)
    schedule = schedules.make_schedule("cosine", 1000)
    size, c, L = fields["image_size"], fields["in_channels"], fields["num_labels"]
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (batch, size, size, c)).astype(np.float32)
    labels = np.eye(L, dtype=np.float32)[rng.integers(0, L, (batch, size, size))]
    t = rng.integers(1, 1000, batch).astype(np.int32)
    noise = rng.standard_normal((batch, size, size, c)).astype(np.float32)
    nchw = lambda a: torch.tensor(np.asarray(a)).permute(0, 3, 1, 2).contiguous().to(setting.torch_device)
    apply_fn = sdm_train.apply_fn_for(model)   # what `jaxboost synth` samples with

    def jax_loss(p, x0, labels, t, noise):
        x_t = schedules.q_sample(schedule, x0, t, noise)
        mse, vb = losses.learned_range_terms(schedule, apply_fn(p, x_t, t, labels), x0, x_t, t, noise)
        return jnp.mean(mse + VLB_WEIGHT * vb)

    tables = [torch.tensor(np.asarray(a, np.float64)).float().to(setting.torch_device) for a in (
        schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, schedule.posterior_mean_coef1,
        schedule.posterior_mean_coef2, schedule.posterior_log_variance_clipped, schedule.log_betas)]
    torch_inputs = (tables, nchw(x0), torch.tensor(t, dtype=torch.long).to(setting.torch_device), nchw(noise),
                    nchw(labels))
    jl = float(jax.jit(jax_loss)(params, x0, labels, t, noise)) if params is not None else None
    tl = None
    if ref is not None:
        with torch.no_grad():
            tl = float(_torch_loss(ref, *torch_inputs, autocast=setting.autocast))
    if jl is not None and tl is not None:
        check_losses(jl, tl, setting)
    return dict(fields=fields, batch=batch, steps=steps, ref=ref, params=params, schedule=schedule, x0=x0,
                labels=labels, nchw=nchw, apply_fn=apply_fn, torch_inputs=torch_inputs, losses=(jl, tl),
                setting=setting)


def check_losses(jl: float, tl: float, setting: harness.Setting | None = None) -> str:
    return (setting or harness.Setting()).check(f"SDM loss (JAX {jl}, torch {tl})", abs(jl - tl) / max(1.0, abs(tl)))


# Largest |difference| of the sampled images ([-1, 1]) allowed between the frameworks: float32 after 5 guided
# DDIM steps of the quick model / the full one; bf16 (each of 2 x steps model calls rounds its convolutions
# to 8 mantissa bits, and guidance at 1.5 amplifies the conditional-unconditional difference).
SAMPLE_TOLERANCE = {("float32", True): 1e-3, ("float32", False): 5e-3, ("bfloat16", True): 0.25,
                    ("bfloat16", False): 0.25}  # bf16, quick size on a CPU: 0.10 measured


def check_samples(ours, theirs, tol: float) -> float:
    err = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    if not err <= tol:
        raise AssertionError(f"SDM DDIM samples JAX vs torch differ by {err} (tolerance {tol:g})")
    return err


def _torch_train_step(model, torch_inputs, autocast=contextlib.nullcontext):
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _torch_loss(model, *torch_inputs, autocast=autocast)
        loss.backward()
        opt.step()
        return loss
    return step


def _cases(s: dict) -> tuple[str, str]:
    size, batch, tag = s["fields"]["image_size"], s["batch"], s["setting"].tag
    return f"sdm/train {size}px b{batch}{tag}", f"sdm/ddim{s['steps']} guided {size}px b{batch}{tag}"


# Timed train steps of a full-size part (`--iters`; one warm-up): a 256 px step is minutes on 2 cores.
FULL_ITERS = {"iters": 3}


def _timing(quick: bool) -> dict:
    """time_call's warm-up and iterations: full-size steps take tens of seconds each on 2 cores."""
    return dict(warmup=2, iters=3) if quick else dict(warmup=1, iters=FULL_ITERS["iters"])


def _jax_rows(s: dict, quick: bool, sample: bool = True) -> tuple[list[Row], np.ndarray | None]:
    """The SDM trainer's own step (EMA, label dropout) and the guided DDIM loop `jaxboost synth` runs (cond +
    uncond batched): rows and the samples, drawn before any train step (the checks compare untrained weights
    on both sides: each side's timed steps train its copy). `sample=False`: the train row only."""
    from jaxboost.diffusion import samplers
    train_case, sample_case = _cases(s)
    jl, tl = s["losses"]
    fields, batch, steps, params, labels = s["fields"], s["batch"], s["steps"], s["params"], s["labels"]
    keys = samplers.per_sample_keys(0, 0, batch)
    run_sampler = samplers.make_sampler(s["apply_fn"], s["schedule"], channels=fields["in_channels"], sampler="ddim",
                                        steps=steps, guidance=1.5)
    sample_rows, ours = [], None
    if sample:   # before the train step, which donates (deletes) these params with its state
        ours = np.asarray(run_sampler(params, labels, keys))
        flops = harness.xla_flops(run_sampler, params, labels, keys, trip_count=steps)
        sec = harness.time_call(lambda: run_sampler(params, labels, keys), warmup=1 if quick else 0,
                                iters=2 if quick else 1)
        sample_rows = [Row(sample_case, "jax", sec, batch / sec, flops, harness.mfu(flops, sec))]
    step, state, device_batch = _product_step(fields, params, s["x0"], labels)
    s["params"] = params = None
    sec, flops = harness.time_product_step(step, state, device_batch, **_timing(quick))
    del state, device_batch
    loss_note = f"loss {jl:.4f}={tl:.4f}" if tl is not None else f"loss {jl:.6f}"
    return [Row(train_case, "jax", sec, batch / sec, flops, harness.mfu(flops, sec),
                note=f"sdm train step (EMA, label dropout); {loss_note}; conv_impl {_conv_note(fields)}")] \
        + sample_rows, ours


def _conv_note(fields: dict) -> str:
    """The convolution form the JAX side ran (the model's default when the fields name none)."""
    from jaxboost.models import layers
    from jaxboost.models.sdm import Model
    impl = fields.get("conv_impl", Model.conv_impl)
    return f"auto = {layers.choose_conv(impl)}" if impl == "auto" else impl


def _torch_rows(s: dict, quick: bool, model, impl: str, sample: bool = True) -> tuple[list[Row], np.ndarray | None]:
    """The torch reference's AdamW step and its guided DDIM loop (two calls per step), `model` eager or
    compiled: rows and the samples (NHWC), drawn before any train step. `sample=False`: the train row only."""
    from benchmarks.torch_ref.sdm_unet import GaussianDiffusion
    from jaxboost.diffusion import samplers, schedules
    train_case, sample_case = _cases(s)
    fields, batch, steps = s["fields"], s["batch"], s["steps"]
    size, c = fields["image_size"], fields["in_channels"]
    diffusion = GaussianDiffusion(s["schedule"].betas, schedules.space_timesteps(1000, f"ddim{steps}"))
    x_T = s["nchw"](samplers.initial_noise(samplers.per_sample_keys(0, 0, batch), (size, size, c)))
    ty, setting = s["torch_inputs"][4], s["setting"]

    def mixed(x, t, y):  # the U-Net in the Setting's precision, the sampler's arithmetic in float32
        with setting.autocast():
            return model(x, t, y).float()
    loop = lambda: diffusion.ddim_sample_loop(mixed, x_T, ty, s=1.5)
    model.eval()
    theirs = loop().permute(0, 2, 3, 1).cpu().numpy() if sample else None
    timing = _timing(quick) if impl == "torch eager" else dict(warmup=2, iters=3)
    sec = harness.time_call(_torch_train_step(model.train(), s["torch_inputs"], setting.autocast),
                            sync=harness.torch_sync, **timing)
    rows = [Row(train_case, impl, sec, batch / sec)]
    if not sample:
        return rows, None
    model.eval()
    sec = harness.time_call(loop, sync=harness.torch_sync, warmup=0, iters=2 if quick else 1)
    return rows + [Row(sample_case, impl, sec, batch / sec)], theirs


def _run_in_process(quick: bool) -> list[Row]:
    """Both frameworks in this process (the quick sizes): outputs checked equal before anything is timed."""
    s = _setup(quick)
    jax_rows, ours = _jax_rows(s, quick)
    torch_rows, theirs = _torch_rows(s, quick, s["ref"], "torch eager")
    tol = SAMPLE_TOLERANCE[s["setting"].dtype, True]
    err = check_samples(ours, theirs, tol)
    jax_rows[1].note = f"{s['setting'].dtype} max|dx|={err:.1e} (tol {tol:g})"
    rows = [jax_rows[0], torch_rows[0], jax_rows[1], torch_rows[1]]
    if not quick:
        rows += _compile_rows(s)
    return s["setting"].label(rows)


def _compile_rows(s: dict) -> list[Row]:
    """torch.compile of the same train step and sampling loop (minutes on CPU; not in --quick)."""
    import torch
    try:
        return _torch_rows(s, False, torch.compile(s["ref"]), "torch compile")[0]
    except Exception as e:  # noqa: BLE001 — torch.compile needs a working C++ toolchain
        return [Row(_cases(s)[0], "torch compile", float("nan"), float("nan"), note=f"failed: {type(e).__name__}")]


# Each framework's full-size measurement in its own process, so JAX and torch never hold the 652 M-parameter
# SDM and its optimiser state at once; seconds each part may take (compilation included): on this 2-core
# CPU, and on one GPU within benchmarks/device_check.sh's 8 minutes (its estimate: compile-bound).
PART_TIMEOUT = {"jax": 2400, "torch eager": 1500, "torch compile": 2400}
PART_TIMEOUT_GPU = {"jax": 110, "torch eager": 40, "torch compile": 90}
# On a GPU torch.compile times the train step only: compiling the eval-mode sampler too would not fit.
TRAIN_ONLY_GPU = ("torch compile",)


def run_part(part: str, out: str, sample: bool = True) -> None:
    """One side of the full-size case: its rows, loss and samples into OUT/<part>.json / .npy."""
    import dataclasses
    import json
    if part == "jax":   # XLA's figure first: a step this machine cannot hold is refused before any allocation
        fields, batch, _ = _fields(False)
        peak = check_step_memory(fields, batch)
        print(f"[speed_sdm] jax train step {fields['image_size']}px b{batch}: XLA peak {peak / 2 ** 30:.1f} GiB",
              flush=True)
    s = _setup(False, part)
    if part == "jax":
        rows, samples = _jax_rows(s, False, sample)
    elif part == "torch eager":
        rows, samples = _torch_rows(s, False, s["ref"], "torch eager", sample)
    else:
        import torch
        rows, samples = _torch_rows(s, False, torch.compile(s["ref"]), "torch compile", sample)
    s["setting"].label(rows)
    name = part.replace(" ", "_")
    if samples is not None:
        np.save(Path(out) / f"{name}.npy", samples)
    (Path(out) / f"{name}.json").write_text(json.dumps(
        {"rows": [dataclasses.asdict(r) for r in rows], "loss": s["losses"][0 if part == "jax" else 1]}))


def _run_parts(quick: bool) -> list[Row]:
    """The full-size case as one process per framework (PART_TIMEOUT each), then the checks: the losses on
    the same weights and batch and the sampled images must agree (a part that failed gives a NaN row)."""
    import json
    import subprocess
    import sys
    import tempfile
    import time
    rows, losses, samples = [], {}, {}
    setting = harness.setting()
    fields, batch, steps = _fields(quick, setting)
    train_case, sample_case = _cases(dict(fields=fields, batch=batch, steps=steps, setting=setting))
    part_timeout = PART_TIMEOUT_GPU if setting.device == "gpu" else PART_TIMEOUT
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="speed_sdm_") as out:
        for part, timeout in part_timeout.items():
            t, name = time.time(), part.replace(" ", "_")
            print(f"[speed_sdm] {part} ...", flush=True)
            train_only = ["--train-only"] if setting.device == "gpu" and part in TRAIN_ONLY_GPU else []
            try:
                rc = subprocess.run([sys.executable, "-m", "benchmarks.speed_sdm", "--part", part, "--out", out]
                                    + train_only, env=env, timeout=timeout).returncode
                error = None if rc == 0 else f"exited with status {rc}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout} s"
            if error or not (Path(out) / f"{name}.json").exists():
                note = f"failed: {error or 'no result'} ({time.time() - t:.0f} s)"
                rows += setting.label([Row(case, part, float("nan"), float("nan"), note=note)
                                       for case in (train_case, sample_case)])
                continue
            doc = json.loads((Path(out) / f"{name}.json").read_text())
            rows += [Row.from_json(r) for r in doc["rows"]]
            losses[part] = doc["loss"]
            if (Path(out) / f"{name}.npy").exists():
                samples[part] = np.load(Path(out) / f"{name}.npy")
    print(harness.format_table(harness.add_ratios(rows)), flush=True)  # in the log even if a check fails below
    if "jax" in losses:
        notes = []
        for part in ("torch eager", "torch compile"):
            if part in losses:
                check_losses(losses["jax"], losses[part], setting)
                note = f"{part}: loss {losses[part]:.4f}"
                if part in samples and "jax" in samples:
                    err = check_samples(samples["jax"], samples[part], SAMPLE_TOLERANCE[setting.dtype, False])
                    note += f", max|dx| {err:.1e}"
                notes.append(note)
        for r in rows:
            if r.impl == "jax":
                r.note = (r.note + "; " if r.note else "") + "; ".join(notes)
    return rows


def run(quick: bool = False):
    return harness.add_ratios(_run_in_process(True) if quick else _run_parts(False))


if __name__ == "__main__":
    import argparse
    import sys
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=list(PART_TIMEOUT), help="one side of the full-size case (internal)")
    parser.add_argument("--out", help="with --part: the folder its results go to")
    parser.add_argument("--in-process", action="store_true", help="full size with both frameworks in one process")
    parser.add_argument("--train-only", action="store_true", help="with --part: the train step, no sampling loop")
    parser.add_argument("--iters", type=int, default=3, help="with --part: timed full-size train steps")
    from jaxboost.models import layers
    parser.add_argument("--conv-impl", choices=layers.CONV_IMPLS.names(), default=None,
                        help="what the model's conv_impl 'auto' runs on this backend (layers.AUTO_CONV)")
    args = parser.parse_args(sys.argv[1:])
    if args.conv_impl:
        layers.AUTO_CONV[jax.default_backend()] = args.conv_impl
    import torch
    torch.set_num_threads(2)
    FULL_ITERS["iters"] = args.iters
    if args.part:
        run_part(args.part, args.out, sample=not args.train_only)
    else:
        rows = _run_in_process(args.quick) if args.in_process or args.quick else _run_parts(False)
        print(harness.format_table(harness.add_ratios(rows)))

"""SDM train step and the whole DDIM sampling loop: jaxboost (jit, one fori_loop) vs the PyTorch reference
(benchmarks/torch_ref/sdm_unet.py; eager, and torch.compile where it works), same weights through the
converter, same batch, same timesteps and noise. Loss: MSE + lambda * VLB (learned-range variance), AdamW.
Outputs are checked equal first (model output, loss, sampled images).

  python -m benchmarks.speed_sdm [--quick]
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from benchmarks import harness
from benchmarks.harness import Row

VLB_WEIGHT = 0.001


def _fields(quick: bool) -> tuple[dict, int, int]:
    """(model fields, train batch, sampler steps). Full: configs/sdm.py:full's model (echo_from_noise's SDM at
    256 px, 652 M parameters, SPADE hidden 128, each block rematerialised as the trainer runs it) in float32
    like the torch reference, batch 1; the guided DDIM loop at 5 steps (10 model calls of ~1 TFLOP each)."""
    if quick:
        return dict(image_size=32, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(16,), num_head_channels=32, num_labels=5, learn_sigma=True,
                    dropout=0.0, use_scale_shift_norm=True, resblock_updown=True), 4, 5
    from jaxboost.config import load_config
    fields = dict(load_config("configs/sdm.py:full").model)
    fields["dtype"] = "float32"
    return fields, 1, 5


def check_memory(fields: dict, batch: int) -> None:
    """Refuse, naming what is needed, a size this machine cannot hold: AdamW + EMA state, gradients and the
    torch reference's copy (5 + 4 float32 copies of the parameters) and torch's saved activations (the
    reference keeps every block's; ~19 GiB per 256 px sample in float32)."""
    import jax

    from jaxboost.models.sdm import Model
    size, c = fields["image_size"], fields["in_channels"]
    shapes = jax.eval_shape(lambda: Model(**fields).init(jax.random.key(0), jnp.zeros((1, size, size, c)),
                                                         jnp.zeros((1,), jnp.int32),
                                                         jnp.zeros((1, size, size, fields["num_labels"]))))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    need = 4 * params * 9 + batch * 19 * 2 ** 30 * (size / 256) ** 2 * (fields["model_channels"] / 256)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > available:
        raise MemoryError(f"SDM {size}px b{batch} ({params / 1e6:.0f} M parameters): needs ~{need / 2 ** 30:.0f} GiB, "
                          f"{available / 2 ** 30:.0f} GiB available")


def _torch_loss(model, diffusion_tables, x0, t, noise, y):
    """improved-diffusion's MSE + lambda * VB (KL branch; t >= 1 here) in torch, float32."""
    import torch
    sqrt_acp, sqrt_1macp, coef1, coef2, post_logvar, log_betas = diffusion_tables
    g = lambda a: a[t].view(-1, 1, 1, 1)
    x_t = g(sqrt_acp) * x0 + g(sqrt_1macp) * noise
    out = model(x_t, t, y)
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


def _product_step(fields: dict, params, x0, labels):
    """(step, state, batch) of `jaxboost train configs/sdm.py` for these model fields: the SDM trainer's loss
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
    state = initial_state(params, tx, 0, ema=True)
    return step, state, {"image": jnp.asarray(x0), "labels": jnp.asarray(np.argmax(labels, -1).astype(np.int32))}


def _setup(quick: bool) -> dict:
    """The torch reference with non-trivial weights, the same weights converted, one batch, and both
    frameworks' loss pieces; the JAX and torch losses are checked equal here, before anything is timed."""
    import torch

    from benchmarks.torch_ref.sdm_unet import unet_from_config
    from jaxboost.convert.sdm import sdm_from_torch_state_dict
    from jaxboost.diffusion import losses, schedules
    from jaxboost.models.sdm import Model
    from jaxboost.train import sdm as sdm_train

    torch.manual_seed(0)
    fields, batch, steps = _fields(quick)
    check_memory(fields, batch)
    cfg = ConfigDict(fields)
    ref = unet_from_config(cfg)
    # Non-zero output layers so outputs and gradients are not trivially equal.
    for name, p in ref.named_parameters():
        if p.abs().sum() == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    params = sdm_from_torch_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()}, cfg)
    model = Model(**fields)
    schedule = schedules.make_schedule("cosine", 1000)
    size, c, L = fields["image_size"], fields["in_channels"], fields["num_labels"]
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (batch, size, size, c)).astype(np.float32)
    labels = np.eye(L, dtype=np.float32)[rng.integers(0, L, (batch, size, size))]
    t = rng.integers(1, 1000, batch).astype(np.int32)
    noise = rng.standard_normal((batch, size, size, c)).astype(np.float32)
    nchw = lambda a: torch.tensor(np.asarray(a)).permute(0, 3, 1, 2).contiguous()
    apply_fn = sdm_train.apply_fn_for(model)   # what `jaxboost synth` samples with

    def jax_loss(p, x0, labels, t, noise):
        x_t = schedules.q_sample(schedule, x0, t, noise)
        mse, vb = losses.learned_range_terms(schedule, apply_fn(p, x_t, t, labels), x0, x_t, t, noise)
        return jnp.mean(mse + VLB_WEIGHT * vb)

    tables = [torch.tensor(np.asarray(a, np.float64)).float() for a in (
        schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, schedule.posterior_mean_coef1,
        schedule.posterior_mean_coef2, schedule.posterior_log_variance_clipped, schedule.log_betas)]
    torch_inputs = (tables, nchw(x0), torch.tensor(t, dtype=torch.long), nchw(noise), nchw(labels))
    jl = float(jax.jit(jax_loss)(params, x0, labels, t, noise))
    with torch.no_grad():
        tl = float(_torch_loss(ref, *torch_inputs))
    if abs(jl - tl) > 1e-4 * max(1.0, abs(tl)):
        raise AssertionError(f"SDM loss JAX {jl} vs torch {tl}")
    return dict(fields=fields, batch=batch, steps=steps, ref=ref, params=params, schedule=schedule, x0=x0,
                labels=labels, nchw=nchw, apply_fn=apply_fn, torch_inputs=torch_inputs, losses=(jl, tl))


def _torch_train_step(model, torch_inputs):
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _torch_loss(model, *torch_inputs)
        loss.backward()
        opt.step()
        return loss
    return step


def _train_rows(s: dict, quick: bool) -> list[Row]:
    """The SDM trainer's own step (EMA, label dropout) vs the torch reference's AdamW step."""
    batch, (jl, tl) = s["batch"], s["losses"]
    case = f"sdm/train {s['fields']['image_size']}px b{batch}"
    step, state, device_batch = _product_step(s["fields"], s["params"], s["x0"], s["labels"])
    sec, flops = harness.time_product_step(step, state, device_batch, iters=3 if quick else 10)
    rows = [Row(case, "jax", sec, batch / sec, flops, harness.mfu(flops, sec),
                note=f"sdm train step (EMA, label dropout); loss {jl:.4f}={tl:.4f}")]
    sec = harness.time_call(_torch_train_step(s["ref"], s["torch_inputs"]), sync=harness.torch_sync,
                            iters=3 if quick else 10)
    return rows + [Row(case, "torch eager", sec, batch / sec)]


def _sampler_rows(s: dict, quick: bool) -> tuple[list[Row], tuple]:
    """The whole guided DDIM loop (cond + uncond batched in JAX; two calls per step in torch), samples
    checked equal first. Returns the rows and (diffusion, x_T, labels) for the torch.compile rows."""
    from benchmarks.torch_ref.sdm_unet import GaussianDiffusion
    from jaxboost.diffusion import samplers, schedules
    fields, batch, steps, params, labels = s["fields"], s["batch"], s["steps"], s["params"], s["labels"]
    size, c = fields["image_size"], fields["in_channels"]
    case = f"sdm/ddim{steps} guided {size}px b{batch}"
    keys = samplers.per_sample_keys(0, 0, batch)
    run_sampler = samplers.make_sampler(s["apply_fn"], s["schedule"], channels=c, sampler="ddim", steps=steps,
                                        guidance=1.5)
    ours = np.asarray(run_sampler(params, labels, keys))
    diffusion = GaussianDiffusion(s["schedule"].betas, schedules.space_timesteps(1000, f"ddim{steps}"))
    x_T, ty = s["nchw"](samplers.initial_noise(keys, (size, size, c))), s["torch_inputs"][4]
    s["ref"].eval()
    theirs = diffusion.ddim_sample_loop(s["ref"], x_T, ty, s=1.5).permute(0, 2, 3, 1).numpy()
    err = float(np.abs(ours - theirs).max())
    if err > 1e-3:
        raise AssertionError(f"SDM DDIM samples JAX vs torch differ by {err}")
    flops = harness.xla_flops(run_sampler, params, labels, keys, trip_count=steps)
    sec = harness.time_call(lambda: run_sampler(params, labels, keys), warmup=1, iters=2 if quick else 5)
    rows = [Row(case, "jax", sec, batch / sec, flops, harness.mfu(flops, sec), note=f"max|dx|={err:.1e}")]
    sec = harness.time_call(lambda: diffusion.ddim_sample_loop(s["ref"], x_T, ty, s=1.5), sync=harness.torch_sync,
                            warmup=1, iters=2 if quick else 5)
    return rows + [Row(case, "torch eager", sec, batch / sec)], (case, diffusion, x_T, ty)


def _compile_rows(s: dict, train_case: str, sampler_case) -> list[Row]:
    """torch.compile of the same train step and sampling loop (minutes on CPU; not in --quick)."""
    import torch
    case, diffusion, x_T, ty = sampler_case
    batch = s["batch"]
    try:
        compiled = torch.compile(s["ref"])
        sec = harness.time_call(_torch_train_step(compiled.train(), s["torch_inputs"]), sync=harness.torch_sync,
                                warmup=2, iters=5)
        rows = [Row(train_case, "torch compile", sec, batch / sec)]
        compiled.eval()
        sec = harness.time_call(lambda: diffusion.ddim_sample_loop(compiled, x_T, ty, s=1.5),
                                sync=harness.torch_sync, warmup=1, iters=3)
        return rows + [Row(case, "torch compile", sec, batch / sec)]
    except Exception as e:  # noqa: BLE001 — torch.compile needs a working C++ toolchain
        return [Row(train_case, "torch compile", float("nan"), float("nan"), note=f"failed: {type(e).__name__}")]


def run(quick: bool = False):
    s = _setup(quick)
    rows = _train_rows(s, quick)
    sample_rows, sampler_case = _sampler_rows(s, quick)
    rows += sample_rows
    if not quick:
        rows += _compile_rows(s, rows[0].case, sampler_case)
    return harness.add_ratios(rows)


if __name__ == "__main__":
    import argparse
    import sys
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(sys.argv[1:])
    import torch
    torch.set_num_threads(2)
    print(harness.format_table(run(args.quick)))

"""Ancestral DDPM, DDIM and DPM-Solver++(2M) samplers: single steps (diffusers-style, stateless) and one
compiled loop.

Single steps take the schedule entry `index` (0 = least noise) rather than a training timestep, so they work
on respaced schedules; the model is called with `schedule.timesteps[index]`. A model output holds eps in the
first C channels and, for learned variance, the Improved-DDPM interpolation value v in [-1, 1] in the next C.

`make_sampler(...)` returns one jitted program: the whole reverse process is a `lax.fori_loop`; per-sample
randomness comes from per-sample keys (noise of sample b at step i = normal(fold_in(k_b, i))), so results do
not depend on the batch composition or on how the batch is sharded across devices. Guidance batches the
conditional and unconditional (all-zero label map, as SDM) passes in one model call; like SDM, the guided
eps is eps_u + s (eps_c - eps_u) while the learned variance is the conditional branch's.

DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) is a multistep solver: the loop carries the previous
step's x_0 prediction beside x_t, so every step stays a pure function of its inputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxboost.diffusion.schedules import Schedule, extract, respace
from jaxboost.registry import Registry


def split_model_output(model_output, channels: int):
    """[..., C] or [..., 2C] -> (eps [..., C], variance values [..., C] or None)."""
    if model_output.shape[-1] == 2 * channels:
        return model_output[..., :channels], model_output[..., channels:]
    if model_output.shape[-1] == channels:
        return model_output, None
    raise ValueError(f"model output has {model_output.shape[-1]} channels; expected {channels} or {2 * channels}")


def predict_x0(schedule: Schedule, sample, index, eps, clip_denoised: bool = True):
    x0 = (extract(schedule.sqrt_recip_alphas_cumprod, index, sample.ndim) * sample
          - extract(schedule.sqrt_recipm1_alphas_cumprod, index, sample.ndim) * eps)
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0


def posterior_mean(schedule: Schedule, x0, sample, index):
    """Mean of q(x_{t-1} | x_t, x_0)."""
    return (extract(schedule.posterior_mean_coef1, index, sample.ndim) * x0
            + extract(schedule.posterior_mean_coef2, index, sample.ndim) * sample)


def model_log_variance(schedule: Schedule, var_values, index, ndim: int):
    """Learned range: v in [-1, 1] interpolates log between the posterior variance and beta; else fixed-large."""
    max_log = extract(schedule.log_betas, index, ndim)
    if var_values is None:  # upstream FIXED_LARGE (its index-0 value is never used: no noise at the last step)
        return max_log
    min_log = extract(schedule.posterior_log_variance_clipped, index, ndim)
    frac = (var_values + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def _per_sample(value, ndim: int):
    """A scalar or per-sample [B] value shaped [B, 1, ..., 1] to broadcast against an ndim-array."""
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def ddpm_step(schedule: Schedule, model_output, index, sample, noise, *, eta: float = 1.0,
              clip_denoised: bool = True):
    """One ancestral step x_t -> x_{t-1}: posterior mean of the predicted x_0 plus the model's std * noise.

    sample, noise [B, H, W, C]; model_output [B, H, W, C or 2C]; index: int or [B]. Returns (x_{t-1}, x_0).
    `eta` is unused (kept so every sampler step has the same signature).
    """
    del eta
    eps, var_values = split_model_output(model_output, sample.shape[-1])
    x0 = predict_x0(schedule, sample, index, eps, clip_denoised)
    mean = posterior_mean(schedule, x0, sample, index)
    log_var = model_log_variance(schedule, var_values, index, sample.ndim)
    nonzero = _per_sample(jnp.asarray(index) > 0, sample.ndim).astype(sample.dtype)
    return mean + nonzero * jnp.exp(0.5 * log_var) * noise, x0


def ddim_step(schedule: Schedule, model_output, index, sample, noise, *, eta: float = 0.0,
              clip_denoised: bool = True):
    """One DDIM step (Song et al. eq. 12); eps is re-derived from the clipped x_0, as improved-diffusion does.

    Returns (x_prev, x_0). With eta = 0 the step is deterministic and `noise` is ignored.
    """
    eps, _ = split_model_output(model_output, sample.shape[-1])
    x0 = predict_x0(schedule, sample, index, eps, clip_denoised)
    eps = ((extract(schedule.sqrt_recip_alphas_cumprod, index, sample.ndim) * sample - x0)
           / extract(schedule.sqrt_recipm1_alphas_cumprod, index, sample.ndim))
    a_t = extract(schedule.alphas_cumprod, index, sample.ndim)
    a_prev = extract(schedule.alphas_cumprod_prev, index, sample.ndim)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t)) * jnp.sqrt(1 - a_t / a_prev)
    mean = x0 * jnp.sqrt(a_prev) + jnp.sqrt(1 - a_prev - sigma ** 2) * eps
    return mean + sigma * noise, x0  # sigma is 0 at index 0 (a_prev = 1)


def _log_snr(alphas_cumprod):
    """lambda = log(alpha / sigma) of the VP diffusion x_t = alpha x_0 + sigma eps (+inf where sigma = 0)."""
    return 0.5 * (jnp.log(alphas_cumprod) - jnp.log1p(-alphas_cumprod))


def dpmpp_2m_step(schedule: Schedule, model_output, index, sample, prev_x0, *, clip_denoised: bool = True):
    """One DPM-Solver++(2M) step x_{s0} -> x_t on the data prediction (Lu et al. 2022, Alg. 2, midpoint form).

    s0 = entry `index`, t = entry index - 1 (x_0 itself at index 0), s1 = entry index + 1, whose x_0 prediction
    is `prev_x0`. The first step (index n-1, no history) and the last one (to sigma = 0) are first order, as
    diffusers' DPMSolverMultistepScheduler (final_sigmas_type="zero"). x_0 comes from the eps channels of a
    learned-variance output (the variance is not used: the solver is deterministic) and is clipped to [-1, 1]
    when `clip_denoised` (improved-diffusion's clip; diffusers' thresholding with sample_max_value=1).
    Returns (x_t, x_0); sample, prev_x0 [B, H, W, C]; index: int or [B].
    """
    eps, _ = split_model_output(model_output, sample.shape[-1])
    x0 = predict_x0(schedule, sample, index, eps, clip_denoised)
    index = jnp.asarray(index)
    n, nd = schedule.num_steps, sample.ndim
    acp_t, acp_s0 = extract(schedule.alphas_cumprod_prev, index, nd), extract(schedule.alphas_cumprod, index, nd)
    acp_s1 = extract(schedule.alphas_cumprod, jnp.minimum(index + 1, n - 1), nd)
    h = _log_snr(acp_t) - _log_snr(acp_s0)            # +inf at the last step (sigma_t = 0)
    h_prev = _log_snr(acp_s0) - _log_snr(acp_s1)
    second_order = _per_sample((index > 0) & (index < n - 1), nd)
    # D0 + D1 / 2 with D1 = (h / h_prev) (x0 - prev_x0); the guard keeps inf/0 out of first-order steps.
    half_ratio = jnp.where(second_order, 0.5 * h / jnp.where(second_order, h_prev, 1.0), 0.0)
    data = x0 + half_ratio * (x0 - prev_x0)
    sigma_ratio = jnp.sqrt((1.0 - acp_t) / (1.0 - acp_s0))
    return sigma_ratio * sample - jnp.sqrt(acp_t) * jnp.expm1(-h) * data, x0


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    step: Callable[..., Any]
    spacing: Callable[[int], str]   # steps -> respacing string (schedules.space_timesteps)
    draws_noise: Callable[[float], bool]  # eta -> whether the loop draws per-step noise
    takes_eta: bool = False         # eta != 0 is refused for samplers that have no eta
    multistep: bool = False         # the step takes the previous x_0 prediction instead of noise


SAMPLERS = Registry("sampler")
SAMPLERS.register("ddpm")(SamplerSpec(ddpm_step, lambda steps: str(steps), draws_noise=lambda eta: True))
SAMPLERS.register("ddim")(SamplerSpec(ddim_step, lambda steps: f"ddim{steps}", draws_noise=lambda eta: eta != 0,
                                      takes_eta=True))
# diffusers' "linspace" timesteps (its DPM-Solver++ default): no model call at t = 0, the last step lands on x_0.
SAMPLERS.register("dpmpp_2m")(SamplerSpec(dpmpp_2m_step, lambda steps: f"linspace{steps}",
                                          draws_noise=lambda eta: False, multistep=True))


def sampler_spec(sampler: str, eta: float = 0.0) -> SamplerSpec:
    """The registered sampler, with eta checked against it (ValueError naming both)."""
    spec = SAMPLERS.get(sampler)
    if eta and not spec.takes_eta:
        raise ValueError(f"eta={eta}: sampler {sampler!r} has no eta (only "
                         f"{[n for n in SAMPLERS.names() if SAMPLERS.get(n).takes_eta]} take one)")
    return spec


def cast_params(params, dtype):
    """Floating leaves of `params` in `dtype` (others untouched); a no-op for leaves already in it. Cast once
    after loading, so each sampler call neither converts the weights nor holds both copies."""
    if dtype is None:
        return params
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) and p.dtype != dtype
                        else p, params)


# ------------------------------------------------------------------------------------------ randomness
def _as_keys(keys):
    return keys if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(keys)


def initial_noise(keys, shape):
    """x_T for each sample: keys [B] -> [B, *shape] (from the first half of split(key_b))."""
    keys = _as_keys(keys)
    return jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], shape))(keys)


def step_noise(keys, index, shape):
    """Noise of reverse step `index` (schedule entry) for each sample: normal(fold_in(split(key_b)[1], index))."""
    keys = _as_keys(keys)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(jax.random.split(k)[1], index), shape))(keys)


def per_sample_keys(seed: int, start: int, count: int):
    """Keys fold_in(key(seed), global index) for indices start..start+count-1 (device-count independent)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count, dtype=jnp.uint32))


# ------------------------------------------------------------------------------------------ the loop
def guided_output(apply_fn, params, x, t, labels, guidance: float | None):
    """Model output with classifier-free guidance; both passes in one call of batch 2B.

    Cond/uncond copies are interleaved per sample ([B, 2, ...] -> [2B, ...]) so a batch-sharded input stays
    sharded with no data movement between devices. guidance None: conditional pass only.
    """
    if guidance is None:
        return apply_fn(params, x, t, labels)
    pair = lambda a, b: jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])
    out = apply_fn(params, pair(x, x), pair(t, t), pair(labels, jnp.zeros_like(labels)))
    out = out.reshape((x.shape[0], 2) + out.shape[1:])
    cond, uncond = out[:, 0], out[:, 1]
    c = x.shape[-1]
    eps = uncond[..., :c] + guidance * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([eps, cond[..., c:]], axis=-1)


def make_sampler(apply_fn, schedule: Schedule, *, channels: int, sampler: str = "ddim", steps: int | None = 50,
                 spacing: str | None = None, eta: float = 0.0, guidance: float | None = 1.5,
                 clip_denoised: bool = True, dtype=None):
    """A jitted `run(params, labels, keys, noise=None) -> images [B, H, W, channels]` (float32).

    apply_fn(params, x [B,H,W,C], t [B] int32, labels [B,H,W,L]) -> [B,H,W,C or 2C].
    schedule: the training schedule; it is respaced to `steps` with the sampler's rule (DDIM: "ddimN",
    DDPM: "N" evenly spaced, DPM-Solver++: "linspaceN") unless `spacing` (any `space_timesteps` string) is
    given; steps None = all.
    keys: [B] per-sample PRNG keys (see `per_sample_keys`); noise: optional x_T.
    dtype: e.g. jnp.bfloat16 to run the model with params and inputs in that dtype (diffusion math in fp32).
    Pass params through `cast_params(params, dtype)` once beforehand; f32 params are cast inside each call.
    The output sharding follows the inputs': shard labels and keys over the batch axis of a mesh.
    """
    spec = sampler_spec(sampler, eta)
    if spacing is None:
        spacing = "" if steps in (None, schedule.num_steps) else spec.spacing(steps)
    spaced = respace(schedule, spacing)
    n = spaced.num_steps
    draws_noise = spec.draws_noise(eta)

    def model_fn(params, x, t, labels):
        if dtype is not None:
            x, labels = x.astype(dtype), labels.astype(dtype)
        out = guided_output(apply_fn, params, x, t, labels, guidance)
        return out.astype(jnp.float32)

    @jax.jit
    def run(params, labels, keys, noise=None):
        params = cast_params(params, dtype)  # nothing to do for params already passed through cast_params
        shape = labels.shape[1:3] + (channels,)
        x = initial_noise(keys, shape) if noise is None else noise.astype(jnp.float32)
        sched = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32) if a.dtype.kind == "f" else jnp.asarray(a),
                             spaced)

        def body(k, carry):
            x, prev_x0 = carry
            i = n - 1 - k
            t = jnp.full((x.shape[0],), sched.timesteps[i], jnp.int32)
            out = model_fn(params, x, t, labels)
            if spec.multistep:
                return spec.step(sched, out, i, x, prev_x0, clip_denoised=clip_denoised)
            noise_i = step_noise(keys, i, shape) if draws_noise else jnp.zeros_like(x)
            return spec.step(sched, out, i, x, noise_i, eta=eta, clip_denoised=clip_denoised)

        return jax.lax.fori_loop(0, n, body, (x, jnp.zeros_like(x)))[0]

    return run


def sample(apply_fn, params, schedule: Schedule, labels, rng, *, channels: int, sampler: str = "ddim",
           steps: int | None = 50, eta: float = 0.0, guidance: float | None = 1.5, dtype=None, noise=None):
    """Convenience: build the compiled sampler and run it once. rng: one key (split per sample) or keys [B]."""
    rng = _as_keys(rng)
    keys = rng if rng.ndim == 1 else jax.random.split(rng, labels.shape[0])
    run = make_sampler(apply_fn, schedule, channels=channels, sampler=sampler, steps=steps, eta=eta,
                       guidance=guidance, dtype=dtype)
    return run(params, labels, keys, noise)

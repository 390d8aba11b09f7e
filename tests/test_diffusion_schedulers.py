"""Schedules and single sampler steps against diffusers' DDPMScheduler / DDIMScheduler, step by step.

diffusers options chosen to be improved-diffusion's (and so SDM's) sampler:
- trained_betas = our betas (the cosine one also equals diffusers' own "squaredcos_cap_v2", checked below);
- clip_sample=True, clip_sample_range=1 (upstream clip_denoised=True), prediction_type="epsilon";
- DDPM variance_type="learned_range" (upstream LEARNED_RANGE); respaced DDPM = diffusers' custom `timesteps`
  (its variance uses alpha_bar[t] / alpha_bar[prev_t], i.e. the respaced beta);
- DDIM timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True (alpha_bar_prev = 1 at the last step,
  as upstream) and use_clipped_model_output=True (upstream re-derives eps from the clipped x_0).
Model outputs and noise are random and shared; each step gets the same x_t (diffusers' trajectory).
diffusers runs in float64 (its tables cast after construction): in float32 it computes the step's beta as
1 - alpha_bar_t / alpha_bar_prev, which loses ~0.3% to cancellation at small t, while improved-diffusion (and
we) build the tables in float64; our float32 step is compared with that exact reference.
"""
import diffusers
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxboost.diffusion import samplers, schedules

SHAPE = (2, 3, 8, 8)  # NCHW for diffusers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def to_nhwc(a):
    return jnp.asarray(np.asarray(a, np.float32).transpose(0, 2, 3, 1))


def test_cosine_and_linear_betas_match_diffusers():
    ours = schedules.make_schedule("cosine", 1000)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=1e-7)
    lin = schedules.make_schedule("linear", 1000)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(lin.betas, ref.betas.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        schedules.make_schedule("sigmoid", 10)


def test_space_timesteps_follows_improved_diffusion_rules():
    assert schedules.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert schedules.space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    steps = schedules.space_timesteps(300, "10,15,20")   # improved-diffusion's docstring example
    assert len(steps) == 45 and steps[0] == 0 and steps[9] == 99 and steps[10] == 100 and steps[-1] == 299
    assert schedules.space_timesteps(10, "3") == [0, 4, 9]
    with pytest.raises(ValueError):
        schedules.space_timesteps(10, "ddim7")
    spaced = schedules.respace(schedules.make_schedule("cosine", 1000), "ddim50")
    base = schedules.make_schedule("cosine", 1000)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[::20], rtol=1e-12)


def _ddpm_scheduler(schedule, timesteps=None):
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, trained_betas=np.asarray(schedule.betas, np.float32),
                                  variance_type="learned_range", clip_sample=True, clip_sample_range=1.0,
                                  prediction_type="epsilon")
    if timesteps is not None:
        sch.set_timesteps(timesteps=list(timesteps))
    return _float64(sch, schedule)


def _float64(sch, schedule):
    sch.betas = torch.tensor(np.asarray(schedule.betas), dtype=torch.float64)
    sch.alphas = 1.0 - sch.betas
    sch.alphas_cumprod = torch.cumprod(sch.alphas, dim=0)
    sch.one = torch.tensor(1.0, dtype=torch.float64)
    sch.final_alpha_cumprod = sch.one
    return sch


@pytest.mark.parametrize("spacing", ["", "50"])
def test_ddpm_learned_range_step_matches_diffusers(spacing, monkeypatch):
    base = schedules.make_schedule("cosine", 1000)
    spaced = schedules.respace(base, spacing)
    ref = _ddpm_scheduler(base, None if not spacing else spaced.timesteps[::-1].tolist())
    gen = torch.Generator().manual_seed(0)
    step = jax.jit(lambda out, i, x, z: samplers.ddpm_step(spaced, out, i, x, z)[0])
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    worst = 0.0
    for i in reversed(range(spaced.num_steps)):
        t = int(spaced.timesteps[i])
        out = torch.cat([torch.randn(SHAPE, generator=gen) * 2, torch.rand(SHAPE, generator=gen) * 2 - 1], dim=1).double()
        noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, **k: noise)
        expected = ref.step(out, t, x).prev_sample
        got = step(to_nhwc(out), i, to_nhwc(x), to_nhwc(noise))
        worst = max(worst, float(np.abs(np.asarray(got) - to_nhwc(expected)).max()))
        x = expected
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("steps,eta", [(50, 0.0), (25, 0.7)])
def test_ddim_step_matches_diffusers(steps, eta):
    base = schedules.make_schedule("cosine", 1000)
    spaced = schedules.respace(base, f"ddim{steps}")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, trained_betas=np.asarray(base.betas, np.float32),
                                  clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                                  timestep_spacing="leading", prediction_type="epsilon")
    ref.set_timesteps(steps)
    ref = _float64(ref, base)
    np.testing.assert_array_equal(ref.timesteps.numpy(), spaced.timesteps[::-1])
    gen = torch.Generator().manual_seed(1)
    step = jax.jit(lambda out, i, x, z: samplers.ddim_step(spaced, out, i, x, z, eta=eta)[0])
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    worst = 0.0
    for i in reversed(range(steps)):
        t = int(spaced.timesteps[i])
        out = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        expected = ref.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
        got = step(to_nhwc(out), i, to_nhwc(x), to_nhwc(noise))
        worst = max(worst, float(np.abs(np.asarray(got) - to_nhwc(expected)).max()))
        x = expected
    assert worst <= 1e-5, worst


def _dpmpp_scheduler(base, clip: bool):
    """diffusers' DPM-Solver++(2M) as the sampler's: learned-range output (eps = first 3 channels), x_0 clipped
    to [-1, 1] when `clip` (dynamic thresholding with sample_max_value=1 is a plain clip), last step to sigma 0."""
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=np.asarray(base.betas, np.float32), algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", prediction_type="epsilon", variance_type="learned_range",
        thresholding=clip, sample_max_value=1.0, lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing="linspace")


@pytest.mark.parametrize("steps,spacing,clip", [(15, None, True), (10, "10", False), (20, None, False)])
def test_dpmpp_2m_step_matches_diffusers(steps, spacing, clip):
    """spacing None: our default ("linspaceN") must be diffusers' own set_timesteps(N); "10": an
    improved-diffusion respacing handed to diffusers as custom timesteps."""
    base = schedules.make_schedule("cosine", 1000)
    spaced = schedules.respace(base, spacing or f"linspace{steps}")
    ref = _dpmpp_scheduler(base, clip)
    if spacing is None:
        ref.set_timesteps(steps)
    else:
        ref.set_timesteps(timesteps=spaced.timesteps[::-1].tolist())
    np.testing.assert_array_equal(ref.timesteps.numpy(), spaced.timesteps[::-1])
    # float64 sigma table (diffusers rounds it to float32; improved-diffusion builds its tables in float64)
    acp = np.asarray(base.alphas_cumprod)[ref.timesteps.numpy()]
    ref.sigmas = torch.tensor(np.append(np.sqrt((1 - acp) / acp), 0.0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    step = jax.jit(lambda out, i, x, prev: samplers.dpmpp_2m_step(spaced, out, i, x, prev, clip_denoised=clip))
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    prev_x0, worst = jnp.zeros(to_nhwc(x).shape), 0.0
    for i, t in zip(reversed(range(steps)), ref.timesteps):
        out = torch.cat([torch.randn(SHAPE, generator=gen), torch.rand(SHAPE, generator=gen) * 2 - 1], dim=1).double()
        expected = ref.step(out, t, x).prev_sample
        got, prev_x0 = step(to_nhwc(out), i, to_nhwc(x), prev_x0)
        # relative to the step's scale: unclipped x_0 at t = 999 is ~1e4 (alpha_bar = 1e-8 on the cosine schedule)
        scale = max(1.0, float(expected.abs().max()))
        worst = max(worst, float(np.abs(np.asarray(got) - to_nhwc(expected)).max()) / scale)
        x = expected
    assert worst <= 1e-5, worst
    assert np.abs(np.asarray(prev_x0)).max() <= 1.0 or not clip


def test_q_sample_matches_diffusers_add_noise():
    base = schedules.make_schedule("linear", 1000)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, trained_betas=np.asarray(base.betas, np.float32))
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([0, 637])
    expected = ref.add_noise(x0, noise, t)
    got = schedules.q_sample(base, to_nhwc(x0), jnp.asarray(t.numpy()), to_nhwc(noise))
    np.testing.assert_allclose(np.asarray(got), to_nhwc(expected), atol=1e-5)


# ------------------------------------------------------------------------------------------ the loss
def numpy_learned_range_terms(betas, model_output, x0, x_t, t, noise):
    """improved-diffusion's training_losses (MSE + VB, LEARNED_RANGE, frozen mean) in float64 numpy, NHWC."""
    acp = np.cumprod(1 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef_x0, coef_xt = betas * np.sqrt(acp_prev) / (1 - acp), (1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp)
    b = lambda a: a[t][:, None, None, None]
    c = x0.shape[-1]
    eps, v = model_output[..., :c], model_output[..., c:]
    x0_pred = np.sqrt(1 / b(acp)) * x_t - np.sqrt(1 / b(acp) - 1) * eps
    mean_p = b(coef_x0) * x0_pred + b(coef_xt) * x_t
    logvar_p = (v + 1) / 2 * np.log(b(betas)) + (1 - (v + 1) / 2) * b(post_logvar)
    mean_q, logvar_q = b(coef_x0) * x0 + b(coef_xt) * x_t, b(post_logvar)
    kl = 0.5 * (-1 + logvar_p - logvar_q + np.exp(logvar_q - logvar_p) + (mean_q - mean_p) ** 2 * np.exp(-logvar_p))
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    inv_std = np.exp(-0.5 * logvar_p)
    plus, minus = cdf(inv_std * (x0 - mean_p + 1 / 255)), cdf(inv_std * (x0 - mean_p - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                             np.log(np.maximum(plus - minus, 1e-12))))
    per = lambda a: a.reshape(len(a), -1).mean(1)
    vb = np.where(t == 0, -per(logp), per(kl)) / np.log(2.0)
    return per((noise - eps) ** 2), vb


def test_learned_range_loss_matches_numpy_improved_diffusion():
    from jaxboost.diffusion import losses
    sched = schedules.make_schedule("cosine", 1000)
    rng = np.random.default_rng(0)
    shape = (4, 8, 8, 3)
    x0 = np.clip(rng.standard_normal(shape) * 0.7, -1, 1)   # includes exact +-1 (decoder edge bins)
    noise, t = rng.standard_normal(shape), np.array([0, 1, 500, 999])
    acp = np.cumprod(1 - sched.betas)[t][:, None, None, None]
    x_t = np.sqrt(acp) * x0 + np.sqrt(1 - acp) * noise
    out = np.concatenate([noise + 0.3 * rng.standard_normal(shape), rng.uniform(-1, 1, shape)], axis=-1)
    mse, vb = losses.learned_range_terms(sched, jnp.asarray(out, jnp.float32), jnp.asarray(x0, jnp.float32),
                                         jnp.asarray(x_t, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    ref_mse, ref_vb = numpy_learned_range_terms(np.asarray(sched.betas), out, x0, x_t, t, noise)
    np.testing.assert_allclose(np.asarray(mse), ref_mse, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(vb), ref_vb, rtol=2e-4, atol=1e-6)
    assert (ref_vb > 0).all()

    # the VB term trains only the variance channels (frozen mean)
    grad = jax.grad(lambda o: losses.learned_range_terms(sched, o, jnp.asarray(x0, jnp.float32),
                                                         jnp.asarray(x_t, jnp.float32), jnp.asarray(t),
                                                         jnp.asarray(noise, jnp.float32))[1].sum())(
        jnp.asarray(out, jnp.float32))
    assert float(jnp.abs(grad[..., :3]).max()) == 0.0 and float(jnp.abs(grad[..., 3:]).max()) > 0


def test_diffusion_loss_drops_whole_label_maps_with_probability_p():
    from jaxboost.diffusion import losses
    labels = jnp.ones((2000, 4, 4, 3))
    dropped = losses.drop_labels(labels, jax.random.key(0), 0.2)
    per_sample = np.asarray(dropped.reshape(2000, -1))
    assert set(np.unique(per_sample.min(1) == per_sample.max(1))) == {True}  # whole maps, never parts
    assert 0.17 < float((per_sample.max(1) == 0).mean()) < 0.23
    assert losses.drop_labels(labels, jax.random.key(0), 0.0) is labels

    sched = schedules.make_schedule("cosine", 1000)
    seen = {}

    def apply_fn(params, x, t, y):
        seen["labels"] = y
        return jnp.concatenate([params * x, jnp.tanh(x)], axis=-1)

    x0 = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3), minval=-1, maxval=1)
    loss, metrics = losses.diffusion_loss(apply_fn, jnp.float32(0.5), sched, x0, labels[:8], jax.random.key(2),
                                          vlb_weight=0.0, cond_drop_prob=0.5)
    assert float(loss) == pytest.approx(float(metrics["mse"])) and np.isfinite(float(metrics["vb"]))
    assert seen["labels"].shape == (8, 4, 4, 3)


def test_decoder_likelihood_at_t0_matches_torch_float32():
    """improved-diffusion's discretized_gaussian_log_likelihood in torch float32 (torch.tanh) on t = 0 values:
    means within ~0.006 of x0 and log-scales near the cosine schedule's first step. XLA's float32 tanh was
    7e-4 nats off here; through the logistic function it is within torch's own float32 rounding."""
    import math
    from jaxboost.diffusion import losses
    rng = np.random.default_rng(0)
    x0 = np.clip(rng.standard_normal(4096) * 0.7, -1, 1).astype(np.float32)
    means = (x0 + rng.standard_normal(4096) * 0.006).astype(np.float32)
    log_scales = rng.uniform(-5.5, -4.5, 4096).astype(np.float32)
    x, m, ls = (torch.tensor(a) for a in (x0, means, log_scales))
    cdf = lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3))))
    plus, minus = cdf(torch.exp(-ls) * (x - m + 1 / 255)), cdf(torch.exp(-ls) * (x - m - 1 / 255))
    expected = torch.where(x < -0.999, torch.log(plus.clamp(min=1e-12)),
                           torch.where(x > 0.999, torch.log((1 - minus).clamp(min=1e-12)),
                                       torch.log((plus - minus).clamp(min=1e-12)))).numpy()
    got = losses.discretized_gaussian_log_likelihood(jnp.asarray(x0), jnp.asarray(means), jnp.asarray(log_scales))
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4, rtol=0)

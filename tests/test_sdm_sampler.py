"""The compiled SDM sampler: DDIM and DPM-Solver++(2M) against step-by-step diffusers loops with the same model
function, guidance, determinism, batch-composition independence, sharding over a mesh, bf16."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxboost.diffusion import samplers, schedules
from jaxboost.models.sdm import Model

MODEL = Model(image_size=16, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
              attention_resolutions=(8,), num_head_channels=32, num_labels=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def params():
    """Random fan-in-scaled params (no zero-initialised output layers), from the shapes alone: compiling
    `init` costs more than the sampler itself on CPU."""
    x, lab = jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 3))
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32), lab)["params"]
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(leaf.shape).astype(np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
        return (name == "scale") + 0.05 * rng.standard_normal(leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def apply_fn(params, x, t, labels):
    return MODEL.apply({"params": params}, x, t, labels)


def masks(batch, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.eye(3, dtype=np.float32)[rng.integers(0, 3, (batch, 16, 16))])


SCHEDULE = schedules.make_schedule("cosine", 1000)


def test_ddim_loop_matches_diffusers_loop_with_guidance(params):
    labels, keys = masks(2), samplers.per_sample_keys(0, 0, 2)
    noise = samplers.initial_noise(keys, (16, 16, 1))
    run = samplers.make_sampler(apply_fn, SCHEDULE, channels=1, sampler="ddim", steps=10, eta=0.0, guidance=1.5)
    ours = np.asarray(run(params, labels, keys, noise))

    # reference: diffusers' DDIMScheduler loop; guidance from two separate model calls
    model = jax.jit(apply_fn)
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, trained_betas=np.asarray(SCHEDULE.betas, np.float32),
                                  clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sch.set_timesteps(10)
    x = torch.tensor(np.asarray(noise)).permute(0, 3, 1, 2)
    for t in sch.timesteps:
        x_nhwc, tt = jnp.asarray(x.permute(0, 2, 3, 1).numpy()), jnp.full((2,), int(t))
        cond = np.asarray(model(params, x_nhwc, tt, labels))[..., :1]
        uncond = np.asarray(model(params, x_nhwc, tt, jnp.zeros_like(labels)))[..., :1]
        eps = torch.tensor(uncond + 1.5 * (cond - uncond)).permute(0, 3, 1, 2)
        x = sch.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    np.testing.assert_allclose(ours, x.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    # deterministic: other keys, same x_T -> same images
    again = run(params, labels, samplers.per_sample_keys(7, 0, 2), noise)
    np.testing.assert_array_equal(np.asarray(again), ours)


def test_dpmpp_2m_loop_matches_diffusers_loop_with_guidance(params):
    """One compiled program (history carried in the loop) vs diffusers' stateful scheduler, 8 model calls."""
    labels, keys = masks(2, seed=3), samplers.per_sample_keys(2, 0, 2)
    noise = samplers.initial_noise(keys, (16, 16, 1))
    run = samplers.make_sampler(apply_fn, SCHEDULE, channels=1, sampler="dpmpp_2m", steps=8, guidance=1.5)
    ours = np.asarray(run(params, labels, keys, noise))

    model = jax.jit(apply_fn)
    sch = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=np.asarray(SCHEDULE.betas, np.float32), algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="epsilon", thresholding=True, sample_max_value=1.0, final_sigmas_type="zero")
    sch.set_timesteps(8)
    x = torch.tensor(np.asarray(noise)).permute(0, 3, 1, 2)
    for t in sch.timesteps:
        x_nhwc, tt = jnp.asarray(x.permute(0, 2, 3, 1).numpy()), jnp.full((2,), int(t))
        cond = np.asarray(model(params, x_nhwc, tt, labels))[..., :1]
        uncond = np.asarray(model(params, x_nhwc, tt, jnp.zeros_like(labels)))[..., :1]
        x = sch.step(torch.tensor(uncond + 1.5 * (cond - uncond)).permute(0, 3, 1, 2), t, x).prev_sample
    np.testing.assert_allclose(ours, x.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="eta=0.5: sampler 'dpmpp_2m' has no eta"):
        samplers.make_sampler(apply_fn, SCHEDULE, channels=1, sampler="dpmpp_2m", steps=8, eta=0.5)


def test_params_cast_once_leave_no_f32_weights_in_the_sampler_program(params):
    """cast_params once (what synth does after loading): the compiled loop then gets bf16 weights and holds no
    f32 copy; f32 params passed as they are still get cast inside the call. Traced only (no compile)."""
    labels, keys = masks(2, seed=5), samplers.per_sample_keys(4, 0, 2)
    run = samplers.make_sampler(apply_fn, SCHEDULE, channels=1, sampler="ddim", steps=3, guidance=1.5,
                                dtype=jnp.bfloat16)
    cast = samplers.cast_params(params, jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    assert samplers.cast_params(cast, jnp.bfloat16)["out_2"]["kernel"] is cast["out_2"]["kernel"]

    def weight_casts(p):  # convert ops applied to the program's weight inputs
        inner = jax.make_jaxpr(run)(p, labels, keys).jaxpr.eqns[0].params["jaxpr"].jaxpr
        weights = set(inner.invars[:len(jax.tree.leaves(p))])
        return sum(e.primitive.name == "convert_element_type" and e.invars[0] in weights for e in inner.eqns)

    assert weight_casts(cast) == 0
    assert weight_casts(params) == len(jax.tree.leaves(params))


def test_guidance_one_equals_conditional_only_sampler_and_bf16_is_close(params):
    labels, keys = masks(2, seed=1), samplers.per_sample_keys(1, 0, 2)
    kw = dict(channels=1, sampler="ddpm", steps=5)
    guided = samplers.make_sampler(apply_fn, SCHEDULE, guidance=1.0, **kw)(params, labels, keys)
    plain = samplers.make_sampler(apply_fn, SCHEDULE, guidance=None, **kw)(params, labels, keys)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=1e-5)
    bf16 = samplers.make_sampler(apply_fn, SCHEDULE, guidance=None, dtype=jnp.bfloat16, **kw)(params, labels, keys)
    assert bf16.dtype == jnp.float32
    assert 0 < np.abs(np.asarray(bf16) - np.asarray(plain)).mean() < 0.05


@pytest.mark.slow
def test_sampler_shards_over_a_mesh_and_each_sample_ignores_its_batch(params):
    labels, keys = masks(4, seed=2), samplers.per_sample_keys(3, 100, 4)
    run = samplers.make_sampler(apply_fn, SCHEDULE, channels=1, sampler="ddim", steps=4, eta=0.5, guidance=1.5)
    single = np.asarray(run(params, labels, keys))
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    batch = NamedSharding(mesh, P("data"))
    sharded = run(jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(labels, batch),
                  jax.device_put(keys, batch))
    assert sharded.sharding.is_equivalent_to(batch, sharded.ndim)
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5)
    # samples 2..3 alone (same keys) are the same images: randomness is per sample, not per batch
    np.testing.assert_allclose(np.asarray(run(params, labels[2:], keys[2:])), single[2:], atol=1e-5)
    assert np.isfinite(single).all() and np.abs(single).max() <= 1.5


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        samplers.make_sampler(apply_fn, SCHEDULE, channels=1, sampler="euler")


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_compiled_sampler_matches_torch_reference_loop(sampler, eta):
    """Same weights (through the converter), same noise: our loop vs the reference loop of the benchmark, which
    follows SDM's p_mean_variance (guidance on eps, conditional variance) and improved-diffusion's respacing."""
    from ml_collections import ConfigDict

    from benchmarks.torch_ref.sdm_unet import GaussianDiffusion, unet_from_config
    from jaxboost.convert.sdm import sdm_from_torch_state_dict
    fields = dict(image_size=16, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_head_channels=32, num_labels=3, learn_sigma=True, dropout=0.0,
                  use_scale_shift_norm=True, resblock_updown=True)
    torch.manual_seed(0)
    ref = unet_from_config(ConfigDict(fields)).eval()
    params = sdm_from_torch_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, ConfigDict(fields))
    labels, keys = masks(2, seed=4), samplers.per_sample_keys(5, 0, 2)
    spacing = "5" if sampler == "ddpm" else "ddim5"
    run = samplers.make_sampler(apply_fn, SCHEDULE, channels=1, sampler=sampler, steps=5, eta=eta, guidance=1.5)
    ours = np.asarray(run(params, labels, keys))

    nchw = lambda a: torch.tensor(np.asarray(a)).permute(0, 3, 1, 2)
    diffusion = GaussianDiffusion(SCHEDULE.betas, schedules.space_timesteps(1000, spacing))
    noise_fn = lambda i: nchw(samplers.step_noise(keys, i, (16, 16, 1)))
    x_T, y = nchw(samplers.initial_noise(keys, (16, 16, 1))), nchw(labels)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else (
        lambda *a, **k: diffusion.ddim_sample_loop(*a, eta=eta, **k))
    expected = loop(ref, x_T, y, s=1.5, noise_fn=noise_fn).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def _fill(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype) if a.dtype.kind == "f"
                        else np.zeros(a.shape, a.dtype), tree)


def test_sampling_loads_only_the_ema_params_fsdp_split_over_the_mesh(tmp_path):
    """A run whose params, Adam moments and EMA differ: load_run returns the EMA alone (the saved values), its
    large leaves split over fsdp (4 of the 8 simulated devices hold 1/4 each) and the rest replicated."""
    import sys
    from pathlib import Path

    from jaxboost import parallel
    from jaxboost.train import checkpoints
    from jaxboost.train import sdm as sdm_train
    sys.path.insert(0, str(Path(__file__).parent))
    from sdm_helpers import tiny_config

    # two levels: the one-level test U-Net's kernels are mostly too small to split
    config = tiny_config(tmp_path / "unused", **{"model.channel_mult": (1, 2), "model.attention_resolutions": (8,)})
    abstract = sdm_train.abstract_state(config)
    state = abstract.replace(step=np.asarray(7, np.int32), rng=np.zeros(abstract.rng.shape, abstract.rng.dtype),
                             params=_fill(abstract.params, 0), opt_state=_fill(abstract.opt_state, 1),
                             ema_params=_fill(abstract.ema_params, 2))
    ckpt = checkpoints.Checkpoints(tmp_path / "run", async_save=False)
    ckpt.save(7, state, meta={})
    ckpt.close()
    (tmp_path / "run" / "config.json").write_text(config.to_json_best_effort())

    mesh = parallel.make_mesh(data=2, fsdp=4)
    _, ema, step = sdm_train.load_run(tmp_path / "run", mesh)
    assert step == 7 and set(ema) == set(state.ema_params)
    jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), want), ema, state.ema_params)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(ema)]
    assert all(leaf.sharding.mesh == mesh for leaf in jax.tree.leaves(ema))
    split = [s for s in specs if "fsdp" in s]
    assert split and len(split) < len(specs)  # big kernels split, biases and norms replicated
    for leaf in jax.tree.leaves(ema):
        per_device = leaf.addressable_shards[0].data.size
        assert per_device == (leaf.size // 4 if "fsdp" in leaf.sharding.spec else leaf.size)
    held = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(ema))
    assert held < 0.6 * sum(leaf.nbytes for leaf in jax.tree.leaves(ema))

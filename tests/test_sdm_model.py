"""SDM U-Net against the PyTorch reference (benchmarks/torch_ref/sdm_unet.py, upstream names and maths) with the
same weights through the converter: outputs within 1e-4 (float32), gradients; the converter's CLI and errors."""
import numpy as np
import pytest
import torch
from ml_collections import ConfigDict

import jax
import jax.numpy as jnp

from jaxboost.config import load_config
from jaxboost.convert import sdm as convert_sdm
from sdm_helpers import random_reference

SMALL = dict(image_size=32, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(16,), num_head_channels=32, num_labels=4, learn_sigma=True, dropout=0.0,
             use_scale_shift_norm=True, resblock_updown=True)
# The SDM's layout at CPU size: 3 levels, 2 res blocks, attention at two resolutions, 2 heads of 32 at width 64
MID = dict(SMALL, image_size=64, in_channels=3, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
           attention_resolutions=(32, 16), num_labels=5)
# upstream's other switches: conv resampling, additive timestep embedding
SMALL_PLAIN = dict(SMALL, resblock_updown=False, use_scale_shift_norm=False)
# echo_from_noise's attention (QKVAttention: q|k|v split before heads), and upstream's fixed head counts
NEW_ORDER = dict(SMALL, num_head_channels=16, use_new_attention_order=True)  # 2 heads of 16
FIXED_HEADS = dict(SMALL, model_channels=64, num_head_channels=-1, num_heads=2, num_heads_upsample=4,
                   use_new_attention_order=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_inputs(fields: dict, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = fields["image_size"]
    x = rng.standard_normal((batch, s, s, fields["in_channels"])).astype(np.float32)
    labels = np.eye(fields["num_labels"], dtype=np.float32)[rng.integers(0, fields["num_labels"], (batch, s, s))]
    labels[-1] = 0.0  # the unconditional (dropped) map
    t = rng.integers(0, 1000, (batch,))
    return x, t, labels


def torch_forward(ref, x, t, labels):
    nchw = lambda a: torch.tensor(a).permute(0, 3, 1, 2)
    return ref(nchw(x), torch.tensor(t), nchw(labels)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("fields", [SMALL, SMALL_PLAIN, MID, NEW_ORDER, FIXED_HEADS],
                         ids=["small", "small_plain", "mid", "new_attention_order", "fixed_heads"])
def test_sdm_matches_torch_reference_outputs(fields):
    ref = random_reference(fields)
    params = convert_sdm.sdm_from_torch_state_dict({k: v.numpy() for k, v in ref.state_dict().items()},
                                                   ConfigDict(fields))
    model = convert_sdm.model_from_config(ConfigDict(fields))
    x, t, labels = random_inputs(fields)
    out = jax.jit(model.apply)({"params": params}, x, t, labels)
    with torch.no_grad():
        expected = torch_forward(ref, x, t, labels).numpy()
    assert out.shape == expected.shape == x.shape[:3] + (2 * fields["in_channels"],)
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero outputs
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=0)


def test_attention_order_is_not_interchangeable():
    """A new-order checkpoint read in the legacy order gives other outputs: the flag must follow the source."""
    ref = random_reference(NEW_ORDER)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    x, t, labels = random_inputs(NEW_ORDER)
    with torch.no_grad():
        expected = torch_forward(ref, x, t, labels).numpy()
    legacy = dict(NEW_ORDER, use_new_attention_order=False)
    out = jax.jit(convert_sdm.model_from_config(ConfigDict(legacy)).apply)(
        {"params": convert_sdm.sdm_from_torch_state_dict(sd, ConfigDict(legacy))}, x, t, labels)
    assert np.abs(np.asarray(out) - expected).max() > 0.1 * np.abs(expected).max()


def test_sdm_gradients_match_torch_reference():
    fields = SMALL
    ref = random_reference(fields, seed=1)
    params = convert_sdm.sdm_from_torch_state_dict({k: v.numpy() for k, v in ref.state_dict().items()},
                                                   ConfigDict(fields))
    model = convert_sdm.model_from_config(ConfigDict(fields))
    x, t, labels = random_inputs(fields, seed=1)
    weights = np.random.default_rng(2).standard_normal(x.shape[:3] + (2,)).astype(np.float32)

    def loss(params, x):
        return jnp.sum(model.apply({"params": params}, x, t, labels) * weights)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    x_t = torch.tensor(x, requires_grad=True)
    out = ref(x_t.permute(0, 3, 1, 2), torch.tensor(t), torch.tensor(labels).permute(0, 3, 1, 2))
    (out.permute(0, 2, 3, 1) * torch.tensor(weights)).sum().backward()
    np.testing.assert_allclose(np.asarray(g_x), x_t.grad.numpy(), atol=1e-4, rtol=1e-3)
    # a SPADE parameter of the decoder: conv [O, I, 3, 3] -> [3, 3, I, O]
    torch_grad = ref.output_blocks[0][0].in_norm.mlp_gamma.weight.grad.numpy().transpose(2, 3, 1, 0)
    ours = np.asarray(g_params["output_blocks_0_0"]["in_norm"]["mlp_gamma"]["kernel"])
    np.testing.assert_allclose(ours, torch_grad, atol=1e-4 * np.abs(torch_grad).max(), rtol=1e-3)


def test_sdm_rejects_labels_of_the_wrong_count():
    model = convert_sdm.model_from_config(ConfigDict(SMALL))
    x = jnp.zeros((1, 32, 32, 1))
    with pytest.raises(ValueError, match="num_labels=4"):
        model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 32, 32, 5)))


def test_convert_cli_writes_params_that_reproduce_the_reference(tmp_path):
    from safetensors.torch import save_file
    # The torch reference keeps upstream's 128-wide SPADE convs; the tiny config narrows them to 32.
    config = load_config("configs/sdm.py:tiny", ["model.spade_hidden=128"])
    ref = random_reference(config.model.to_dict(), seed=3)
    ckpt = tmp_path / "ema.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    from jaxboost.cli import main
    assert main(["convert", "sdm", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                 "--config", "configs/sdm.py:tiny", "--set", "model.spade_hidden=128"]) == 0
    params = convert_sdm.load_params(str(tmp_path / "out"))
    model = convert_sdm.model_from_config(config.model)
    x, t, labels = random_inputs(config.model.to_dict(), seed=3)
    with torch.no_grad():
        expected = torch_forward(ref, x, t, labels).numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x, t, labels)), expected, atol=1e-4)
    # a .pt state dict read with weights_only=True gives the same params
    torch.save(ref.state_dict(), tmp_path / "ema.pt")
    again = convert_sdm.sdm_from_torch_state_dict(convert_sdm.load_state_dict(str(tmp_path / "ema.pt")),
                                                  config.model)
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params))


def test_converter_errors_name_the_problem(tmp_path):
    ref_sd = {k: v.numpy() for k, v in random_reference(SMALL).state_dict().items()}
    with pytest.raises(ValueError, match="not an SDM/guided-diffusion U-Net"):  # another model's checkpoint
        other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2))
        convert_sdm.sdm_from_torch_state_dict({k: v.numpy() for k, v in other.state_dict().items()},
                                              ConfigDict(SMALL), source="resnet.pt")
    with pytest.raises(ValueError, match="without SPADE"):  # an unconditional guided-diffusion U-Net
        plain = {k: v for k, v in ref_sd.items() if "mlp_" not in k}
        convert_sdm.sdm_from_torch_state_dict(plain, ConfigDict(SMALL))
    with pytest.raises(ValueError, match="num_labels=4, the config num_labels=5"):
        convert_sdm.sdm_from_torch_state_dict(ref_sd, ConfigDict(dict(SMALL, num_labels=5)))
    with pytest.raises(ValueError, match="not mapped.*extra.weight"):
        convert_sdm.sdm_from_torch_state_dict(dict(ref_sd, **{"extra.weight": np.zeros(3)}), ConfigDict(SMALL))
    with pytest.raises(ValueError, match="'out.2.bias'.*missing"):
        convert_sdm.sdm_from_torch_state_dict({k: v for k, v in ref_sd.items() if k != "out.2.bias"},
                                              ConfigDict(SMALL))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        convert_sdm.load_state_dict(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("size", [(16, 12), (40, 30), (7, 5)])
def test_label_resize_matches_torch_nearest(size):
    from jaxboost.models.sdm import resize_nearest
    a = np.random.default_rng(0).random((2, 64, 48, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.tensor(a).permute(0, 3, 1, 2), size=size, mode="nearest")
    np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(a), size)),
                                  expected.permute(0, 2, 3, 1).numpy())


# echo_from_noise's model at CPU size: its attention flags, the rest shrunk
ECHO_SHRUNK = ["model.image_size=32", "model.in_channels=1", "model.model_channels=64", "model.channel_mult=(1, 2)",
               "model.num_res_blocks=1", "model.attention_resolutions=(16,)", "model.num_head_channels=32",
               "model.num_labels=4", "model.dtype=float32", "data.size=32", "data.num_labels=4"]


def test_echo_from_noise_config_has_its_flags_and_converts_its_checkpoints(tmp_path):
    from safetensors.torch import save_file
    config = load_config("configs/sdm.py:echo_from_noise")
    assert config.model.use_new_attention_order and config.model.num_head_channels == 64
    assert config.diffusion.cond_drop_prob == 0.0 and config.diffusion.vlb_weight == 0.001
    assert (config.sampler.name, config.sampler.steps, config.sampler.guidance) == ("ddpm", 1000, None)
    assert config.optim.schedule == "linear_to_zero" and config.total_steps == 50_000

    config = load_config("configs/sdm.py:echo_from_noise", ECHO_SHRUNK)
    ref = random_reference(config.model.to_dict(), seed=4)
    assert ref.middle_block[1].new_order
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "ema.safetensors"))
    from jaxboost.cli import main
    assert main(["convert", "sdm", "--checkpoint", str(tmp_path / "ema.safetensors"), "--out", str(tmp_path / "out"),
                 "--config", "configs/sdm.py:echo_from_noise", "--set", *ECHO_SHRUNK]) == 0
    model = convert_sdm.model_from_config(config.model)
    x, t, labels = random_inputs(config.model.to_dict(), seed=4)
    with torch.no_grad():
        expected = torch_forward(ref, x, t, labels).numpy()
    out = jax.jit(model.apply)({"params": convert_sdm.load_params(str(tmp_path / "out"))}, x, t, labels)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)

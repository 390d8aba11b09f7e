"""`jaxboost export sdm`: torch -> jaxboost -> torch gives back the same state dict, and written in the other
attention order the file loads strictly into that order's UNetModel with the same outputs."""
import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from safetensors.numpy import load_file

from benchmarks.torch_ref.sdm_unet import unet_from_config
from jaxboost.cli import main
from jaxboost.config import load_config
from jaxboost.convert import sdm as convert_sdm
from jaxboost.export import sdm as export_sdm
from sdm_helpers import random_reference

# two heads of 16 in every attention block, so the two orders differ
FIELDS = dict(image_size=16, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
              attention_resolutions=(8,), num_head_channels=16, num_labels=4, learn_sigma=True, dropout=0.0,
              use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _forward(ref, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((2, 1, 16, 16)), dtype=torch.float32)
    labels = torch.tensor(np.eye(4, dtype=np.float32)[rng.integers(0, 4, (2, 16, 16))]).permute(0, 3, 1, 2)
    with torch.no_grad():
        return ref(x, torch.tensor([5, 900]), labels).numpy()


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
def test_export_round_trips_and_converts_the_attention_order(new_order):
    fields = dict(FIELDS, use_new_attention_order=new_order)
    ref = random_reference(fields)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = convert_sdm.sdm_from_torch_state_dict(sd, ConfigDict(fields))
    back = export_sdm.torch_state_dict(params, ConfigDict(fields))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

    other = dict(fields, use_new_attention_order=not new_order)
    flipped = export_sdm.torch_state_dict(params, ConfigDict(fields), new_attention_order=not new_order)
    assert any(not np.array_equal(flipped[k], sd[k]) for k in sd if k.endswith("qkv.weight"))
    target = unet_from_config(ConfigDict(other)).eval()
    target.load_state_dict({k: torch.from_numpy(v) for k, v in flipped.items()}, strict=True)
    np.testing.assert_allclose(_forward(target), _forward(ref), atol=1e-5, rtol=0)


def test_export_cli_writes_safetensors_of_a_converted_run(tmp_path):
    from safetensors.torch import save_file
    shrunk = ["data.size=16", "model.image_size=16", "model.channel_mult=(1, 2)", "model.attention_resolutions=(8,)",
              "model.spade_hidden=128", "model.num_head_channels=16", "model.num_labels=4", "data.num_labels=4"]
    config = load_config("configs/sdm.py:tiny", shrunk)
    ref = random_reference(config.model.to_dict(), seed=1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "in.safetensors"))
    assert main(["convert", "sdm", "--checkpoint", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "run"),
                 "--config", "configs/sdm.py:tiny", "--set", *shrunk]) == 0
    assert main(["export", "sdm", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "ema.safetensors"),
                 "--attention-order", "new"]) == 0
    exported = load_file(str(tmp_path / "ema.safetensors"))
    target = unet_from_config(ConfigDict(dict(config.model.to_dict(), use_new_attention_order=True))).eval()
    target.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    np.testing.assert_allclose(_forward(target), _forward(ref), atol=1e-5, rtol=0)

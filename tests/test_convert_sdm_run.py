"""A converted SDM checkpoint works in every command: `convert sdm` writes a run folder that `synth --checkpoint`,
`eval --workdir` and `train --config.init_from` read as they are, holding the torch weights exactly."""
import json

import jax
import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from safetensors.torch import save_file

from benchmarks.torch_ref.sdm_unet import unet_from_config
from jaxboost.cli import main
from jaxboost.config import load_config
from jaxboost.convert import sdm as convert_sdm
from sdm_helpers import SIZE, phantom_corpus

# One level with attention at it: the commands need a converted U-Net, not every block kind (test_sdm_model's
# conversion test maps the whole architecture's keys).
SHRUNK = [f"data.size={SIZE}", f"model.image_size={SIZE}", "model.channel_mult=(1,)",
          f"model.attention_resolutions=({SIZE},)", "model.spade_hidden=128", "sampler.steps=2", "batch_size=8",
          "eval_every=0", "ckpt_every=0", "log_every=1"]


@pytest.mark.slow
def test_converted_sdm_runs_in_synth_eval_and_train(tmp_path):
    corpus = phantom_corpus(tmp_path)
    config = load_config("configs/sdm.py:tiny", SHRUNK)
    torch.manual_seed(0)
    ref = unet_from_config(ConfigDict(config.model.to_dict()))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "ema.safetensors"))
    out = tmp_path / "converted"
    assert main(["convert", "sdm", "--checkpoint", str(tmp_path / "ema.safetensors"), "--out", str(out),
                 "--config", "configs/sdm.py:tiny", "--set", *SHRUNK, f"data.corpus={corpus}"]) == 0
    assert json.loads((out / "config.json").read_text())["trainer"] == "sdm"
    params = convert_sdm.load_params(str(out))
    np.testing.assert_array_equal(params["out_2"]["bias"], ref.state_dict()["out.2.bias"].numpy())
    # a second conversion into the same folder is refused, the folder left as it was
    with pytest.raises(ValueError, match="already holds a run"):
        convert_sdm.save_params(params, str(out), config)

    assert main(["synth", "--checkpoint", str(out), "--masks", str(corpus), "--out", str(tmp_path / "synth"),
                 "--per-mask", "1", "--sampler", "ddim", "--steps", "2", "--guidance", "0", "--splits", "val"]) == 0
    manifest = json.loads((tmp_path / "synth" / "manifest.json").read_text())
    assert manifest["counts"]["val"] > 0

    assert main(["eval", "--workdir", str(out), "--split", "val"]) == 0
    assert np.isfinite(json.loads((out / "eval_val.json").read_text())["val/loss"])

    run = tmp_path / "finetune"
    assert main(["train", "--config", "configs/sdm.py:tiny", "--workdir", str(run), "--config.total_steps=1",
                 f"--config.data.corpus={corpus}", f"--config.init_from={out}",
                 *(f"--config.{kv}" for kv in SHRUNK)]) == 0
    trained = jax.tree.map(np.asarray, convert_sdm.load_params(str(run)))
    # one AdamW step from the converted weights: close to them, not equal
    delta = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params)))
    assert 0 < delta < 0.05

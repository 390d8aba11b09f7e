"""The SDM trainer: loss falls on the phantom, EMA params and a sample grid are written, resume is exact."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxboost.train import loop
from jaxboost.train import sdm as sdm_train

sys.path.insert(0, str(Path(__file__).parent))
from sdm_helpers import SIZE, phantom_corpus, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return phantom_corpus(tmp_path_factory.mktemp("sdm_train"))


def _state(workdir, config):
    _, ema, step = sdm_train.load_run(workdir)
    abstract = sdm_train.abstract_state(config)
    state, _, _ = loop.load_params(workdir, abstract, prefer="latest")
    return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, ema), step


@pytest.mark.slow
def test_sdm_loss_falls_on_phantom_and_writes_ema_and_sample_grid(corpus, tmp_path):
    steps = 40
    config = tiny_config(corpus, total_steps=steps, eval_every=steps, **{"optim.lr": 2e-3})
    summary = sdm_train.train(config, tmp_path)
    losses = [m["train/loss"] for m in loop.read_metrics(tmp_path) if "train/loss" in m]
    assert len(losses) == steps
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:4]), losses
    assert summary["evals"] and "val/loss" in summary["evals"][-1]
    grid = np.asarray(Image.open(tmp_path / "samples" / f"step_{steps:06d}.png"))
    assert grid.shape[0] > grid.shape[1] > 0  # 8 rows of mask | real | sample
    params, ema, step = _state(tmp_path, config)
    assert step == steps
    # EMA (decay 0.99) lags the params but has moved from the initialisation
    init = jax.tree.map(np.asarray, sdm_train.init_params(sdm_train.build_model(config), config,
                                                          jax.random.PRNGKey(config.seed)))
    leaf = lambda t: t["out_2"]["kernel"]  # zero-initialised output conv
    assert np.abs(leaf(init)).max() == 0 and np.abs(leaf(ema)).max() > 0
    assert not np.allclose(leaf(ema), leaf(params))


def test_sdm_resume_after_restart_continues_exactly(corpus, tmp_path):
    over = {"diffusion.cond_drop_prob": 0.5, "ckpt_every": 3}
    sdm_train.train(tiny_config(corpus, total_steps=6, **over), tmp_path / "straight")
    sdm_train.train(tiny_config(corpus, total_steps=3, **over), tmp_path / "restarted")
    sdm_train.train(tiny_config(corpus, total_steps=6, **over), tmp_path / "restarted")  # resumes at 3
    config = tiny_config(corpus, total_steps=6, **over)
    (p1, e1, s1), (p2, e2, s2) = _state(tmp_path / "straight", config), _state(tmp_path / "restarted", config)
    assert s1 == s2 == 6
    for a, b in zip(jax.tree.leaves((p1, e1)), jax.tree.leaves((p2, e2))):
        np.testing.assert_array_equal(a, b)
    losses = lambda d: [m["train/loss"] for m in loop.read_metrics(d) if "train/loss" in m]
    assert losses(tmp_path / "restarted") == losses(tmp_path / "straight")

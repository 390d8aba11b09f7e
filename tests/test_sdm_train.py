"""The SDM trainer: loss falls on the phantom, EMA params and a sample grid are written, resume is exact."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxboost.train import checkpoints, metrics_writer
from jaxboost.train import sdm as sdm_train

sys.path.insert(0, str(Path(__file__).parent))
from sdm_helpers import phantom_corpus, tiny_config  # noqa: E402

STEPS = 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return phantom_corpus(tmp_path_factory.mktemp("sdm_train"))


def _state(workdir, config):
    _, ema, step = sdm_train.load_run(workdir)
    state, _, _ = checkpoints.load_params(workdir, sdm_train.abstract_state(config), prefer="latest")
    return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, ema), step


@pytest.mark.slow
def test_sdm_loss_falls_writes_ema_and_grid_and_resume_continues_exactly(corpus, tmp_path):
    # the three runs compile the same step once: conftest's persistent cache serves the second and third
    over = {"optim.lr": 2e-3, "ckpt_every": STEPS // 2}
    config = tiny_config(corpus, total_steps=STEPS, eval_every=STEPS, **over)
    summary = sdm_train.train(config, tmp_path / "straight")

    losses = [m["train/loss"] for m in metrics_writer.read_metrics(tmp_path / "straight") if "train/loss" in m]
    assert len(losses) == STEPS
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:3]), losses
    assert summary["evals"] and np.isfinite(summary["evals"][-1]["val/loss"])
    grid = np.asarray(Image.open(tmp_path / "straight" / "samples" / f"step_{STEPS:06d}.png"))
    assert grid.shape[0] > grid.shape[1] > 0  # 8 rows of mask | real | sample
    params, ema, step = _state(tmp_path / "straight", config)
    assert step == STEPS
    leaf = lambda t: t["out_2"]["kernel"]  # zero-initialised output conv: the EMA has moved, and lags
    assert np.abs(leaf(ema)).max() > 0 and not np.allclose(leaf(ema), leaf(params))

    # Stop half-way, restart the same command: the same params, EMA and losses as the straight run.
    sdm_train.train(tiny_config(corpus, total_steps=STEPS // 2, **over), tmp_path / "restarted")
    sdm_train.train(tiny_config(corpus, total_steps=STEPS, **over), tmp_path / "restarted")
    params2, ema2, step2 = _state(tmp_path / "restarted", config)
    assert step2 == STEPS
    for a, b in zip(jax.tree.leaves((params, ema)), jax.tree.leaves((params2, ema2))):
        np.testing.assert_array_equal(a, b)
    losses2 = [m["train/loss"] for m in metrics_writer.read_metrics(tmp_path / "restarted") if "train/loss" in m]
    assert losses2 == losses

"""Contrastive tower pretraining: the loss against hand-worked figures, and a few steps on a phantom corpus
whose saved towers load into the CLIPSeg demo model unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxboost import config as config_lib
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import phantom
from jaxboost.losses.contrastive import clip_loss
from jaxboost.train import clip_towers, vl_seg


def test_clip_loss_counts_every_same_structure_pair_as_a_positive():
    labels = jnp.asarray([1, 1, 2])
    emb = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # logit scale log(10): similarities 10 (same structure) or 0; each row's targets 1/2, 1/2, 0 (or 0, 0, 1)
    loss = clip_loss(emb, emb, labels, jnp.log(10.0))
    row_lv = -np.log(np.exp(10) / (2 * np.exp(10) + 1))
    row_myo = -np.log(np.exp(10) / (np.exp(10) + 2))
    assert float(loss) == pytest.approx((2 * row_lv + row_myo) / 3, rel=1e-5)
    flipped = clip_loss(emb, emb[::-1], labels, jnp.log(10.0))
    assert float(flipped) > float(loss) + 1.0


def test_region_pairs_darken_the_background(tmp_path):
    source = phantom.write_phantom(tmp_path / "phantom", patients=4, seed=1, size=(64, 48))
    items, info = corpus_lib.camus_items(source, size=32, source="phantom")
    corpus_lib.build_corpus(items, tmp_path / "real", size=32, source="phantom", source_info=info)
    images, labels, prompts = clip_towers.region_pairs(str(tmp_path / "real"), 32, background=0.0)
    record = next(iter(corpus_lib.open_corpus(tmp_path / "real").iter("train")))
    outside = np.asarray(record["mask"]) != record["label"]
    assert images.shape[1:] == (32, 32) and labels[0] == record["label"]
    assert np.all(images[0][outside] == 0) and images[0][~outside].max() > 0
    assert len(prompts[0]) == 14 and "" not in prompts[0]     # P1-P7, both endings


def test_a_few_steps_write_towers_clipseg_loads(tmp_path):
    source = phantom.write_phantom(tmp_path / "phantom", patients=4, seed=1, size=(64, 48))
    items, info = corpus_lib.camus_items(source, size=64, source="phantom")
    corpus_lib.build_corpus(items, tmp_path / "real", size=64, source="phantom", source_info=info)
    cfg = config_lib.load_config("configs/clip_towers.py:demo")
    cfg.update_from_flattened_dict({"data.corpus": str(tmp_path / "real"), "steps": 3, "batch_size": 6})
    summary = clip_towers.train(cfg, tmp_path / "towers")
    assert summary["steps"] == 3 and np.isfinite(summary["loss_last"]) and -1 <= summary["cos_LA_LV"] <= 1
    seg = config_lib.load_config("configs/clipseg.py:demo")
    seg.update_from_flattened_dict({"data.corpus": str(tmp_path / "real"),
                                    "pretrained": str(tmp_path / "towers" / "towers"),
                                    "data.tokenizer": str(tmp_path / "towers" / "tokenizer")})
    tokenizer = vl_seg.tokenizer_for(seg, str(tmp_path / "run"))
    model = vl_seg.build_model(seg, tokenizer)
    variables = vl_seg.host_variables(seg, model)      # checks every saved tensor fits the model
    _, saved = clip_towers.load_converted(str(tmp_path / "towers" / "towers"))
    got = jax.tree_util.tree_leaves(variables["params"]["text"])
    want = jax.tree_util.tree_leaves(saved["params"]["text"])
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert "post_layernorm" not in saved["params"] and "film_mul" in variables["params"]

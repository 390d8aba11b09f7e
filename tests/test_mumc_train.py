"""MUMC trainers on a tiny phantom corpus (32 px): pretraining lowers every loss term, resumes exactly with its
momentum model and queues, gives the same step on 4 devices (data, data x fsdp) as on 1 with negatives over
the global batch; VQA finetuning from the pretraining run trains, selects on validation and reports accuracy."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxboost import parallel
from jaxboost.config import load_config
from jaxboost.train import metrics_writer, mumc_pretrain, mumc_vqa, optim

TINY = ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1", "model.vision_width=32",
        "model.text_width=32", "model.vision_mlp_dim=64", "model.text_mlp_dim=64", "model.vision_heads=2",
        "model.text_heads=2", "batch_size=8"]
# No augmentation, a fast momentum model and a short alpha ramp so that a short run moves every term (the
# defaults are checked by the config tests). The corpus holds 72 records: a queue beyond one batch holds the
# positives' own images as negatives often enough to collapse the image features, and 8 px patches (4x4 tokens)
# cannot see the highlighted structure, hence a one-batch queue and 4 px patches. ITM with hard negatives is
# the slowest term: in a sweep of 4 seeds it stayed at its prior (0.64) for ~200 steps, then fell to 0.46-0.54
# by step 600, while the image-side terms fell in every seed by step 200 (and in only some by step 64).
PRETRAIN = TINY + ["data.tokenizer_vocab_size=200", "model.embed_dim=16", "queue_size=8", "optim.warmup_steps=0", "optim.lr=2e-3",
                   "momentum=0.9", "alpha_ramp_epochs=0.2", "data.augment=False", "log_every=1",
                   "data.highlight_structure=True", "model.patch_size=4", "optim.epoch_steps=150"]
STEPS = 600


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from jaxboost.data import corpus as corpus_lib, phantom
    root = tmp_path_factory.mktemp("mumc")
    ph = phantom.write_phantom(root / "phantom", patients=6, seed=1, size=(32, 32))
    items, info = corpus_lib.camus_items(ph, size=32, source="phantom")
    corpus_lib.build_corpus(items, root / "corpus", size=32, source="phantom", source_info=info)
    return root / "corpus"


def pretrain_config(corpus, *extra):
    return load_config("configs/mumc_pretrain.py:tiny", PRETRAIN + [f"data.corpus={corpus}", *extra])


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pt") / "run"
    summary = mumc_pretrain.train(pretrain_config(corpus, f"total_steps={STEPS}", "ckpt_every=0"), workdir)
    return workdir, summary


TERMS = ("mlm", "ita", "i2t", "t2i", "i2i", "t2t", "itm")


def _window_means(workdir, term):
    """Mean of a term over the 12 steps after the queue holds real features and alpha is at 0.4, and over
    the last 12 steps (before that the random queue makes ITA artificially easy)."""
    rows = [r for r in metrics_writer.read_metrics(workdir) if "train/mlm" in r]
    return np.mean([r[f"train/{term}"] for r in rows[2:14]]), np.mean([r[f"train/{term}"] for r in rows[-12:]])


# The smallest fall among 4 seeds at 600 steps: ITM 0.10, every other term > 0.5.
MARGIN = {"itm": 0.05}


def test_tiny_pretraining_logs_every_term_and_ramps_alpha(pretrained):
    workdir, summary = pretrained
    rows = [r for r in metrics_writer.read_metrics(workdir) if "train/mlm" in r]
    assert len(rows) == STEPS and summary["final_step"] == STEPS
    assert all(np.isfinite(r[f"train/{t}"]) for r in rows for t in TERMS)
    assert rows[0]["train/alpha"] == 0.0 and rows[-1]["train/alpha"] == pytest.approx(0.4)   # the ramp
    assert (workdir / "tokenizer" / "vocab.txt").is_file()


@pytest.mark.parametrize("term", TERMS)
def test_tiny_pretraining_lowers_every_term(pretrained, term):
    before, after = _window_means(pretrained[0], term)
    assert after < before - MARGIN.get(term, 0.3), f"{term}: {before:.4f} -> {after:.4f}"


def test_lr_decay_epoch_is_fixed_on_tiny_and_the_data_pass_on_full():
    """The x0.9 decay and the alpha ramp count 50-step epochs on `tiny` whatever the corpus size (a
    72-record corpus would decay every 9 steps) and one pass over the data on `full` (MUMC)."""
    tiny, full = (load_config(f"configs/mumc_pretrain.py:{v}") for v in ("tiny", "full"))
    assert mumc_pretrain.schedule_epoch_steps(tiny, 72) == mumc_pretrain.schedule_epoch_steps(tiny, 7200) == 50
    assert mumc_pretrain.schedule_epoch_steps(full, 256 * 300) == 300
    tiny.optim.epoch_steps = -5
    with pytest.raises(ValueError, match="config.optim.epoch_steps=-5"):
        mumc_pretrain.schedule_epoch_steps(tiny, 72)


def test_pretraining_evaluation_reports_every_term_and_retrieval(pretrained, corpus):
    """`jaxboost eval` of a pretraining run: the loss terms (batch scalars) and in-batch recall@1 on val."""
    workdir, _ = pretrained
    result = mumc_pretrain.evaluate(pretrain_config(corpus, f"total_steps={STEPS}"), workdir, "val")
    for term in TERMS + ("loss",):
        assert np.isfinite(result[f"val/{term}"]), term
    for key in ("val/i2t_r1", "val/t2i_r1"):
        assert 0.0 <= result[key] <= 1.0


@pytest.mark.slow
def test_pretraining_resumes_exactly_with_momentum_and_queues(pretrained, corpus, tmp_path):
    """Stop at step 12, restart: the final params, momentum model, queues and pointer equal the
    uninterrupted run's (the checkpoint holds them, and the data position and in-graph draws repeat)."""
    STEPS = 24
    full_dir, workdir = tmp_path / "full", tmp_path / "resumed"
    # One vocabulary for both runs (a restart reuses its workdir's; WordPiece training is not deterministic).
    vocab = f"data.tokenizer={pretrained[0] / 'tokenizer'}"
    q = "queue_size=16"   # two batches, so the queue pointer moves
    mumc_pretrain.train(pretrain_config(corpus, f"total_steps={STEPS}", "ckpt_every=0", vocab, q), full_dir)
    mumc_pretrain.train(pretrain_config(corpus, "total_steps=12", "ckpt_every=12", vocab, q), workdir)
    summary = mumc_pretrain.train(pretrain_config(corpus, f"total_steps={STEPS}", "ckpt_every=0", vocab, q), workdir)
    assert summary["start_step"] == 12
    config = pretrain_config(corpus, f"total_steps={STEPS}", vocab, q)
    *_, full, step_full = mumc_pretrain.restore(config, full_dir)
    *_, resumed, step_resumed = mumc_pretrain.restore(config, workdir)
    assert step_full == step_resumed == STEPS
    queues = full.extra["queues"]
    assert int(queues["ptr"]) == (STEPS * 8) % 16
    assert not np.allclose(full.extra["momentum"]["text_proj"]["kernel"], full.params["text_proj"]["kernel"])
    for name, a, b in (("params", full.params, resumed.params), ("extra", full.extra, resumed.extra)):
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{name}{jax.tree_util.keystr(path)}")


@pytest.mark.slow
@pytest.mark.parametrize("data,fsdp", [(4, 1), (2, 2)])
def test_pretraining_step_on_4_devices_equals_1_device(pretrained, corpus, data, fsdp):
    """One MUMC step on a mesh (global-batch negatives, hard negatives and queue write across shards; FSDP
    splits the kernels) gives the loss, terms, gradients (through the update) and new momentum/queues of the
    1-device step."""
    workdir, _ = pretrained
    # SGD at lr 1: the update is the gradient itself, so params compare the gradients to 1e-5 (Adam's first
    # step, g / |g|, would turn float noise in near-zero gradients into +-lr differences).
    config = pretrain_config(corpus, "total_steps=10", "log_every=100", "optim.name=sgd", "optim.lr=1.0")
    tokenizer = mumc_pretrain.get_tokenizer(config, workdir)
    model = mumc_pretrain.build_model(config, tokenizer.vocab_size)
    tx = optim.make_optimizer(config, 10, 4)
    init_fn = mumc_pretrain.make_init_fn(config, model, tx)
    step_fn = mumc_pretrain.make_step_fn(config, model, tx, tokenizer, epoch_steps=4)
    loader, _ = mumc_pretrain.make_train_loader(config)
    batch = mumc_pretrain.tokenize_batch(tokenizer, config.data.max_tokens)(next(iter(loader)))

    def run(mesh):
        state, shardings = parallel.create_sharded(init_fn, mesh, fsdp_min_size=64)
        state = state.replace(step=jnp.asarray(5, jnp.int32))    # alpha > 0: distillation on
        out = jax.jit(step_fn, out_shardings=(shardings, None))(state, parallel.shard_batch(mesh, batch))
        return jax.device_get(out)

    one_state, one = run(parallel.make_mesh(1, 1, jax.devices()[:1]))
    mesh = parallel.make_mesh(data, fsdp, jax.devices()[:4])
    if fsdp > 1:  # the test is about sharded kernels: make sure some are
        specs = parallel.param_specs(jax.eval_shape(init_fn).params, mesh, fsdp_min_size=64)
        assert any("fsdp" in tuple(s) for s in jax.tree.leaves(specs, is_leaf=lambda x: hasattr(x, "index")))
    many_state, many = run(mesh)
    for k in ("loss", *TERMS):
        np.testing.assert_allclose(many[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves((one_state.params, one_state.extra)),
                    jax.tree.leaves((many_state.params, many_state.extra))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def echo_vqa(corpus, tmp_path_factory):
    from jaxboost.data import echo_vqa as echo
    out = tmp_path_factory.mktemp("vqa") / "echo_vqa"
    echo.build_echo_vqa(corpus, out)
    return out


def vqa_config(root, *extra):
    return load_config("configs/mumc_vqa.py:tiny", TINY + [
        f"data.root={root}", "model.decoder_depth=1", "top_k=4", "log_every=5", "eval_every=6",
        "model.patch_size=4",  # as the pretraining run (PRETRAIN)
        *extra])


@pytest.mark.slow
def test_vqa_finetune_from_pretraining_runs_and_reports_accuracy(pretrained, echo_vqa, tmp_path, capsys):
    pt_dir, _ = pretrained
    workdir = tmp_path / "vqa"
    summary = mumc_vqa.train(vqa_config(echo_vqa, "total_steps=6", f"init_from={pt_dir}"), workdir)
    assert summary["final_step"] == 6 and summary["selection_split"] == "val"
    assert summary["best_step"] == 6 and 0.0 <= summary["best_metric"] <= 1.0
    assert (workdir / "tokenizer" / "vocab.txt").read_text() == (pt_dir / "tokenizer" / "vocab.txt").read_text()
    result = mumc_vqa.evaluate(vqa_config(echo_vqa), workdir, "test")
    n_items = len(json.loads((echo_vqa / "testset.json").read_text()))
    assert result["test/n"] == n_items == result["test/n_open"] + result["test/n_closed"]
    for kind in ("overall", "open", "closed"):
        assert 0.0 <= result[f"test/{kind}"] <= 1.0
    overall = (result["test/open"] * result["test/n_open"] + result["test/closed"] * result["test/n_closed"]) / n_items
    assert result["test/overall"] == pytest.approx(overall)
    table = capsys.readouterr().out
    assert "overall" in table and "closed" in table and "fixed protocol" in table


def test_vqa_rejects_unknown_protocol(echo_vqa, tmp_path):
    with pytest.raises(ValueError, match="config.protocol"):
        mumc_vqa.train(vqa_config(echo_vqa, "protocol=lenient"), tmp_path / "x")


@pytest.mark.slow   # a 2-step pretraining run and the VQA task: ~100 s on the shared 2-core machine
def test_vqa_momentum_model_starts_from_the_pretraining_momentum_encoders(corpus, echo_vqa, tmp_path):
    """MUMC's VQA.py loads the pretraining `*_m` tensors into its momentum copies: our VQA momentum model is
    the pretraining momentum tree mapped as the params are (decoder from momentum text layers fusion..)."""
    pt_dir = tmp_path / "pt"
    mumc_pretrain.train(pretrain_config(corpus, "total_steps=2", "ckpt_every=0", "momentum=0.5"), pt_dir)
    config = vqa_config(echo_vqa, f"init_from={pt_dir}")
    task = mumc_vqa.make_task(config, tmp_path / "vqa")
    state = jax.jit(task.init_state)()
    pt = mumc_pretrain.restore(pretrain_config(corpus), pt_dir)[3]
    mom_text, vqa_mom = pt.extra["momentum"]["text"], state.extra["momentum"]
    np.testing.assert_array_equal(vqa_mom["decoder"]["layer0"]["crossattention"]["query"]["kernel"],
                                  mom_text["layer1"]["crossattention"]["query"]["kernel"])
    np.testing.assert_array_equal(vqa_mom["vision"]["cls_token"], pt.extra["momentum"]["vision"]["cls_token"])
    np.testing.assert_array_equal(state.params["text"]["layer0"]["output"]["kernel"],
                                  pt.params["text"]["layer0"]["output"]["kernel"])
    assert not np.array_equal(vqa_mom["text"]["layer0"]["output"]["kernel"],
                              state.params["text"]["layer0"]["output"]["kernel"])

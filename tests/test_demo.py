"""`jaxboost demo`: the convergence speed-up against hand-worked figures, the scarce-label corpus, the
report's wording, bad flags, and (slow) the whole pipeline on a phantom written in the CAMUS layout."""
import json
import os

import numpy as np
import pytest

from jaxboost import cli, demo
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import phantom


def _evals(values, steps_per_epoch):
    return [{"step": (i + 1) * steps_per_epoch, "wall_s": 10.0 * (i + 1), demo.METRIC: v}
            for i, v in enumerate(values)]


def test_speedup_worked_example():
    # real only: best 95 -> target 94.05, first reached at its 4th epoch (40 s); the finetune (3 steps per
    # epoch, not 6) is at 96 in its 2nd epoch (20 s): 4 / 2 = 2x in epochs, 40 / 20 = 2x in wall time.
    c = demo.convergence_speedup(_evals([50, 80, 90, 95], 6), _evals([85, 96, 97], 3), demo.METRIC, 6, 3)
    assert c["target"] == pytest.approx(94.05)
    assert (c["epochs_real"], c["epochs_finetune"]) == (4, 2)
    assert c["speedup_epochs"] == pytest.approx(2.0) and c["speedup_wall"] == pytest.approx(2.0)


def test_speedup_not_reached_reads_as_such():
    c = demo.convergence_speedup(_evals([50, 95], 6), _evals([60, 70], 6), demo.METRIC, 6, 6)
    assert c["epochs_finetune"] is None and c["speedup_epochs"] is None
    assert demo.fmt_value(c["speedup_epochs"], ".2f", "x") == "not reached"
    assert demo.fmt_value(1.5, ".2f", "x") == "1.50x"
    assert demo.fmt_speedup(demo.spread([None, None])) == "not reached in any seed"
    assert demo.fmt_speedup(demo.spread([2.0, None])) == "2.00 ± 0.00x over the 1 seed that reached it"


def test_spread_and_win_counts():
    s = demo.spread([84.0, 86.0, 88.0, None])
    assert (s["mean"], s["sd"], s["n"]) == (86.0, 2.0, 3)   # sample sd of 84, 86, 88
    run = lambda real_ep, ft_ep, real_dice, ft_dice: {
        "real": {"summary": {"evals": _evals([50] * (real_ep - 1) + [90], 1), "steps_per_epoch": 1,
                             "best_metric": 90}, "test": {"test/dice_mean": real_dice}},
        "synthetic": {"summary": {"evals": [], "best_metric": 40}, "test": {"test/dice_mean": 30.0}},
        "pretrain_finetune": {"summary": {"evals": _evals([50] * (ft_ep - 1) + [90], 1), "steps_per_epoch": 1,
                                          "best_metric": 90}, "test": {"test/dice_mean": ft_dice}}}
    s = demo.model_summary({0: run(6, 3, 85.0, 87.0), 1: run(6, 6, 85.0, 84.0), 2: run(4, 2, 80.0, 80.0)})
    assert (s["faster_in"], s["wins_in"]) == (2, 2)
    assert s["speedup_epochs"]["mean"] == pytest.approx((2.0 + 1.0 + 2.0) / 3)


@pytest.fixture(scope="module")
def camus_phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("camus")
    return phantom.write_phantom(root / "phantom", patients=8, seed=3, size=(64, 48))


def test_scarce_corpus_keeps_first_patients_and_whole_eval_splits(camus_phantom, tmp_path):
    items, info = corpus_lib.camus_items(camus_phantom, size=32, source="phantom")
    real = tmp_path / "real"
    corpus_lib.build_corpus(items, real, size=32, source="phantom", source_info=info)
    train_ids = sorted({r["patient"] for r in corpus_lib.open_corpus(real).iter("train", arrays=False)})
    scarce = demo.stage_scarce(tmp_path, real, 2)
    got, full = corpus_lib.open_corpus(scarce), corpus_lib.open_corpus(real)
    assert {r["patient"] for r in got.iter("train", arrays=False)} == set(train_ids[:2])
    assert got.split_len("train") == 2 * 4 * 3          # 2 patients x (2 views x 2 phases) x 3 structures
    for split in ("val", "test"):
        assert [r["key"] for r in got.iter(split, arrays=False)] == [r["key"] for r in full.iter(split, arrays=False)]
    assert demo.stage_scarce(tmp_path, real, 0) == real


def test_bad_flags_fail_in_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), "--models", "clipseg,unet"]) == 2
    assert "unknown segmenter 'unet'" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(out), "--set", "clipseg=3"]) == 2
    assert "--set 'clipseg=3'" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(out), "--set", "cris.no_such_field=1"]) == 2
    assert cli.main(["demo", "--out", str(out), "--worker-nice", "20"]) == 2
    assert "--worker-nice must be in 0..19" in capsys.readouterr().err
    assert not out.exists()


def test_parse_sets_values():
    sets = demo.parse_sets(["clipseg.pretrained=/w/conv", "cris.model.num_layers=2", "sdm.optim.lr=1e-4",
                            "clipseg.model.head_kernels=[2,2]"])
    assert sets["clipseg"] == {"pretrained": "/w/conv", "model.head_kernels": (2, 2)}
    assert sets["cris"] == {"model.num_layers": 2} and sets["sdm"] == {"optim.lr": 1e-4}


# Smaller programs than tiny's (fewer levels, blocks and layers): each stage compiles faster, and every stage
# still runs.
SMALL = ["--set", "sdm.model.channel_mult=[1,2]",
         "--set", "sdm.model.attention_resolutions=[]",
         "--set", "clipseg.model.vision_depth=2", "--set", "clipseg.model.extract_layers=[0,1]",
         "--set", "clipseg.model.text_depth=1", "--set", "cris.model.text_depth=1",
         "--set", "clip_towers.steps=2", "--set", "clip_towers.batch_size=8"]


@pytest.mark.slow
def test_demo_on_a_camus_layout_folder_with_tiny_flags(camus_phantom, tmp_path):
    out = tmp_path / "demo"
    # tiny segmenters, 2-step SDM and sampler, one epoch, one seed: every stage runs (the towers' too, and
    # the segmenter runs in two worker processes, the real-only ones beside the towers, SDM and synthetic
    # stages), and the persistent compilation cache compiles each program once for all three regimes (the
    # spread over seeds is test_spread_and_win_counts')
    argv = ["demo", "--camus", str(camus_phantom), "--out", str(out), "--models", "clipseg,cris", "--seeds", "1",
            "--real-patients", "2", "--per-mask", "1", "--sdm-steps", "2", "--sampler-steps", "2", "--epochs", "1",
            "--pretrain-epochs", "1", "--variant", "tiny", "--batch-size", "8", "--set", "sdm.batch_size=8",
            # niced workers beside another pytest worker got a tenth of a core: 827 s against 321 s
            "--worker-nice", "0", *SMALL]
    assert cli.main(argv) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["data"]["train_patients"] == 2 and report["data"]["synthetic_train"] == 2 * 4 * 3
    for model in ("clipseg", "cris"):
        m = report["models"][model]
        assert sorted(m["per_seed"]) == ["0"] and m["seeds"] == 1
        dice = [r["pretrain_finetune"]["test"]["test/dice_mean"] for r in m["per_seed"].values()]
        assert all(0.0 <= d <= 100.0 for d in dice)
        for png in (f"curves_{model}.png", f"overlays_{model}.png"):
            assert (out / "report" / png).stat().st_size > 1000
    assert (out / "towers" / "towers" / "model.json").exists()
    clipseg_run = json.loads((out / "clipseg" / "seed0" / "real" / "config.json").read_text())
    assert clipseg_run["pretrained"] == str(out / "towers" / "towers")
    text = (out / "report" / "report.md").read_text()
    assert "CAMUS data" in text and "not reachedx" not in text
    assert np.isfinite(report["timings"]["sdm"]["cpu_s"])
    assert set(report["timings"]) >= {"data", "towers", "sdm", "synth", "clipseg", "cris",
                                      "segmenters (pipelined)"}
    # a second run resumes: every stage is complete, the report is rewritten (in this process: both orders
    # skip a finished stage through the same check, and spawning the workers again only costs their imports)
    assert cli.main([*argv, "--jobs", "1"]) == 0


def test_clipseg_demo_head_draws_at_the_input_size():
    import jax
    import jax.numpy as jnp

    from jaxboost.config import load_config
    from jaxboost.models.clipseg import Model
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in load_config("configs/clipseg.py:demo").model.items()}
    model = Model(**{**fields, "vocab_size": 100})
    args = (jnp.zeros((2, 64, 64, 3)), jnp.zeros((2, 64), jnp.int32), jnp.ones((2, 64), jnp.int32))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    assert jax.eval_shape(model.apply, variables, *args).shape == (2, 64, 64)   # 16x16 tokens, x2 x2 upsampled
    assert variables["params"]["head_up1"]["kernel"].shape[:2] == (2, 2)
    with pytest.raises(ValueError, match="must multiply to the patch size 4"):
        jax.eval_shape(Model(**{**fields, "vocab_size": 100, "head_kernels": (2, 4)}).init, jax.random.PRNGKey(0),
                       *args)


def test_worker_env_reaches_spawned_processes_and_is_restored(monkeypatch):
    """The demo's workers start with one BLAS thread and glibc keeping freed memory; this process's
    environment is as it was afterwards."""
    import multiprocessing
    from jaxboost import parallel
    monkeypatch.delenv("MALLOC_TOP_PAD_", raising=False)
    with parallel.worker_env():
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            seen = pool.apply(os.getenv, ("MALLOC_TOP_PAD_",))
    assert seen == parallel.WORKER_MALLOC_ENV["MALLOC_TOP_PAD_"]
    assert "MALLOC_TOP_PAD_" not in os.environ

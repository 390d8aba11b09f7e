"""Every trainer through the one Task interface: one step of each task's tiny config through `loop.fit`, its
evaluation through the same evaluator path, the run reopened by its workdir, and the same result from the same
seed; and the run lifecycle (lock, refused resume, total_steps=0, same vocabulary from the same texts, the same
global batches on any number of hosts)."""
from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxboost.config import load_config
from jaxboost.data.tokenize_bert import BertTokenizer
from jaxboost.train import loop, metrics_writer, runs, workdir as workdir_lib

sys.path.insert(0, str(Path(__file__).parent))
import sdm_helpers  # noqa: E402

SIZE = 32
MUMC_TINY = ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1", "model.vision_width=32",
             "model.text_width=32", "model.vision_mlp_dim=64", "model.text_mlp_dim=64", "model.vision_heads=2",
             "model.text_heads=2", "batch_size=8", "model.patch_size=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from jaxboost.data import corpus as corpus_lib, echo_vqa, phantom
    root = tmp_path_factory.mktemp("tasks")
    ph = phantom.write_phantom(root / "phantom", patients=6, seed=1, size=(32, 32))
    items, info = corpus_lib.camus_items(ph, size=SIZE, source="phantom")
    corpus_lib.build_corpus(items, root / "corpus", size=SIZE, source="phantom", source_info=info)
    echo_vqa.build_echo_vqa(root / "corpus", root / "vqa")
    return {"corpus": root / "corpus", "vqa": root / "vqa", "sdm": sdm_helpers.phantom_corpus(root / "sdm")}


def one_step(config):
    """One step, logged and evaluated; fields a config leaves out (unet: no evals) are added."""
    for key, value in dict(total_steps=1, log_every=1, eval_every=1, ckpt_every=0).items():
        setattr(config, key, value)
    return config


TASK_CONFIGS = {
    "unet_seg": lambda d: load_config("configs/unet_phantom.py:tiny", [f"data.corpus={d['corpus']}",
                                                                       f"data.size={SIZE}"]),
    "sdm": lambda d: sdm_helpers.tiny_config(d["sdm"]),
    "clipseg": lambda d: load_config("configs/clipseg.py:tiny", [f"data.corpus={d['corpus']}", f"data.size={SIZE}",
                                                                 "batch_size=8", f"model.vision_image_size={SIZE}"]),
    "mumc_pretrain": lambda d: load_config("configs/mumc_pretrain.py:tiny", MUMC_TINY + [
        f"data.corpus={d['corpus']}", "queue_size=8", "data.tokenizer_vocab_size=200", "model.embed_dim=16"]),
    "mumc_vqa": lambda d: load_config("configs/mumc_vqa.py:tiny", MUMC_TINY + [
        f"data.root={d['vqa']}", "model.decoder_depth=1", "top_k=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASK_CONFIGS))
def test_every_task_trains_one_step_through_fit_and_evaluates_through_the_evaluator(name, data, tmp_path):
    from jaxboost import registry
    config = one_step(TASK_CONFIGS[name](data))
    workdir = tmp_path / name
    task = registry.trainer(config.trainer).make_task(config, workdir)
    state, summary = loop.fit(task, workdir)
    assert int(state.step) == 1 and summary["final_step"] == 1, name
    rows = metrics_writer.read_metrics(workdir)
    assert [r["step"] for r in rows if "train/loss" in r] == [1] and np.isfinite(rows[0]["train/loss"]), name
    assert summary["evals"] and all(np.isfinite(v) for v in summary["evals"][0].values()), name
    # the first step's trace and compile are inside the eval's wall clock, and counted apart
    assert 0 < summary["evals"][0]["compile_s"] <= summary["evals"][0]["wall_s"], name
    # the finished run opens by its workdir alone and evaluates through the same path
    run = runs.open_run(workdir, prefer="latest")
    assert run.step == 1 and run.task.name == task.name
    result = run.task.evaluate(run.state, task.eval_split)
    assert result.keys() == {k for k in summary["evals"][0] if k not in ("step", "wall_s", "cpu_s", "compile_s")}, name
    saved = json.loads((workdir / "run.json").read_text())
    assert saved["total_steps"] == 1 and saved["task"] == task.name
    # same seed, same result: a second run from scratch (its own tokenizer, loader, init) is bit-identical
    again, _ = loop.fit(registry.trainer(config.trainer).make_task(config, tmp_path / "again"), tmp_path / "again")
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(again.params))):
        np.testing.assert_array_equal(a, b)


def test_total_steps_zero_is_refused_by_name():
    from jaxboost.train.task import RunLength
    config = load_config("configs/unet_phantom.py:tiny", ["total_steps=0"])
    with pytest.raises(ValueError, match="config.total_steps=0"):
        RunLength.from_config(config)


def test_wordpiece_vocabulary_is_the_same_every_time(tmp_path):
    texts = [f"the {w} of a {a}-year-old {s} in end {p}" for w in ("left ventricle", "myocardium", "left atrium")
             for a in ("sixty", "seventy") for s in ("man", "woman") for p in ("diastole", "systole")]
    vocabs = [BertTokenizer.train(texts, str(tmp_path / str(i)), vocab_size=200).hf.get_vocab() for i in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    tok = BertTokenizer.from_folder(str(tmp_path / "0"))
    ids, _ = tok.tokenize(["the left ventricle"])
    assert tok.hf.convert_ids_to_tokens(ids[0][:5].tolist()) == ["[CLS]", "the", "left", "ventricle", "[SEP]"]


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242")
    try:
        with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"{tmp_path}.*pid 4242"):
            with workdir_lib.WorkdirLock(tmp_path):
                pass
    finally:
        os.close(fd)
    with workdir_lib.WorkdirLock(tmp_path):   # free again once the holder is gone
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_resume_on_another_corpus_is_refused_and_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/clipseg.py:tiny", ["data.corpus=corpus_a", "init_from=runs/pre"])
    absolute = workdir_lib.with_absolute_paths(config)
    assert absolute.data.corpus == str(tmp_path / "corpus_a") and absolute.init_from == str(tmp_path / "runs/pre")
    (tmp_path / "w").mkdir()
    workdir_lib.record(tmp_path / "w", absolute, {})
    before = (tmp_path / "w" / "config.json").read_text()
    other = workdir_lib.with_absolute_paths(load_config("configs/clipseg.py:tiny", ["data.corpus=corpus_b"]))
    with pytest.raises(ValueError, match="corpus_a, not .*corpus_b"):
        workdir_lib.check_same_corpus(tmp_path / "w", other)
    assert (tmp_path / "w" / "config.json").read_text() == before


def test_metrics_rows_past_the_restored_step_are_dropped(tmp_path):
    writer = metrics_writer.MetricWriter(tmp_path)
    for step in (1, 2, 3, 4):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    metrics_writer.MetricWriter(tmp_path, resume_step=2).close()
    assert [r["step"] for r in metrics_writer.read_metrics(tmp_path)] == [1, 2]


def test_vqa_and_caption_loaders_give_the_same_global_batches_on_1_2_and_4_hosts():
    from jaxboost.train import mumc_pretrain

    source = [{"x": np.int32(i)} for i in range(40)]

    def global_batches(hosts: int, n: int = 4):
        its = [iter(mumc_pretrain.host_sliced_loader(source, global_batch_size=8, seed=3, process_index=p,
                                                     process_count=hosts)) for p in range(hosts)]
        return [np.concatenate([next(it)["x"] for it in its]).tolist() for _ in range(n)]

    one = global_batches(1)
    assert len({tuple(b) for b in one}) == 4 and all(len(set(b)) == 8 for b in one)
    assert global_batches(2) == one and global_batches(4) == one

"""`jaxboost synth`: counts and record contract, the same corpus on 1 and 4 devices, exact resume after
SIGKILL, two processes writing disjoint shards whose union is the single-process corpus, clear errors."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxboost import parallel, synth
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import labels as labels_lib
from jaxboost.train import sdm as sdm_train

sys.path.insert(0, str(Path(__file__).parent))
from sdm_helpers import SIZE, phantom_corpus, tiny_config  # noqa: E402
from test_corpus_remote import bucket  # noqa: E402,F401 (the fixture)
from cpu_env import xla_flags  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 2
OPTS = dict(per_mask=K, sampler="ddim", steps=2, guidance=1.5, seed=7, records_per_shard=6, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A masks corpus and an SDM run (random weights: synth's bookkeeping does not need a trained model)."""
    root = tmp_path_factory.mktemp("synth")
    corpus = phantom_corpus(root)
    run = root / "sdm"
    sdm_train.train(tiny_config(corpus, total_steps=1), run)
    reference = root / "reference"
    synth.generate(run, corpus, reference, batch_size=4,
                   mesh=parallel.make_mesh(devices=jax.devices()[:1]), **OPTS)
    return corpus, run, reference


def _records(out: Path) -> dict[str, list[dict]]:
    c = corpus_lib.open_corpus(out, verify=True)
    return {s: list(c.iter(s)) for s in corpus_lib.SPLITS}


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.array_record"))}


def test_synth_writes_k_augmented_triplets_per_mask_with_source_metadata(setup):
    corpus, run, reference = setup
    source = corpus_lib.open_corpus(corpus)
    records = _records(reference)
    assert records["test"] == []
    changed = []
    for split_id, split in ((0, "train"), (1, "val")):
        sources = [r for r in source.iter(split) if r["structure"] == "LV"]
        got = records[split]
        assert len({r["key"] for r in got}) == len(got)
        images = [list(g) for _, g in itertools.groupby(got, key=lambda r: r["key"].rsplit("/", 1)[0])]
        assert len(images) == len(sources) * K
        for s, src in enumerate(r for r in sources for _ in range(K)):
            triplet = images[s]
            mask, cone = synth.augmented_sample(src, split_id, s, OPTS["seed"])
            # a record per structure the augmented mask still holds (none claiming an empty one)
            assert [r["structure"] for r in triplet] == [
                name for name in labels_lib.STRUCTURES if (mask == labels_lib.LABEL_OF[name]).any()]
            name = src["key"].split("/")[1]
            for r in triplet:
                assert r["key"] == f"synthetic/{name}_aug{s % K}/{r['structure']}"
                assert r["source"] == "synthetic" and r["split"] == split
                assert {k: r[k] for k in ("patient", "view", "phase", "sex", "age")} == \
                       {k: src[k] for k in ("patient", "view", "phase", "sex", "age")}
                np.testing.assert_array_equal(r["mask"], mask)
                np.testing.assert_array_equal(r["cone"], cone)
                assert r["image"].shape == (SIZE, SIZE) and r["image"].dtype == np.uint8
                assert len(r["prompts"]) == 8 and not any("quality" in p for pair in r["prompts"] for p in pair)
            changed.append(not np.array_equal(mask, src["mask"]))
    assert np.mean(changed) > 0.5  # augmented, not copied (a 16 px mask can survive a small draw)
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["config"]["synth"]["per_mask"] == K and manifest["counts"]["train"] == len(records["train"])


@pytest.mark.slow
def test_synth_corpus_is_the_same_on_one_and_four_devices(setup, tmp_path):
    corpus, run, reference = setup
    synth.generate(run, corpus, tmp_path / "four", batch_size=8, mesh=parallel.make_mesh(devices=jax.devices()[:4]),
                   **OPTS)
    assert _shard_bytes(tmp_path / "four") == _shard_bytes(reference)
    assert json.loads((tmp_path / "four" / "manifest.json").read_text())["shards"] == \
           json.loads((reference / "manifest.json").read_text())["shards"]


def _synth_cmd(run, corpus, out, *extra):
    return [sys.executable, "-m", "jaxboost.cli", "synth", "--checkpoint", str(run), "--masks", str(corpus),
            "--out", str(out), "--per-mask", str(K), "--steps", "2", "--guidance", "1.5", "--seed", "7",
            "--records-per-shard", "6", *extra]


def test_synth_writes_to_a_gs_bucket_the_shards_it_writes_locally(setup, bucket, capsys):
    # --out gs://...: the corpus goes through etils.epath (an in-process bucket; see test_corpus_remote),
    # shards staged locally and uploaded, process 0's manifest merged from the part on the bucket.
    corpus, run, reference = setup
    out = bucket / "synth"
    manifest = synth.generate(run, corpus, str(out), batch_size=4,
                              mesh=parallel.make_mesh(devices=jax.devices()[:1]), **{**OPTS, "progress": True})
    local = corpus_lib.open_corpus(reference).manifest
    assert manifest["shards"] == local["shards"] and manifest["counts"] == local["counts"]
    assert corpus_lib.open_corpus(str(out)).verify() == []
    # A run with progress says how long the device sat idle waiting for the host.
    assert re.search(r"device idle \d+\.\d% of the sampling time", capsys.readouterr().out)


@pytest.mark.slow
def test_synth_killed_then_rerun_equals_an_uninterrupted_run(setup, tmp_path):
    corpus, run, reference = setup
    out = tmp_path / "killed"
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    proc = subprocess.Popen(_synth_cmd(run, corpus, out, "--batch-size", "1"), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out.glob("train-*.array_record"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.array_record")))
    assert 2 <= done < len(list(reference.glob("*.array_record"))), "kill came too late to test a resume"
    assert not (out / "manifest.json").exists()
    synth.generate(run, corpus, out, batch_size=8, **OPTS)  # resumes (8 devices here)
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_two_processes_write_disjoint_shards_whose_union_is_the_single_process_corpus(setup, tmp_path):
    corpus, run, reference = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAXBOOST_PORT=str(port))
    out = tmp_path / "two"
    cmd = ["bash", "launch/local_multiprocess.sh", "2", "1", *_synth_cmd(run, corpus, out, "--batch-size", "2")]
    done = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    writers = {p.name.split("-")[1] for p in out.glob("*.array_record")}
    assert writers == {"w000", "w001"}
    two, one = _records(out), _records(reference)
    for split in ("train", "val"):
        by_key = lambda rs: {r["key"]: r for r in rs}
        a, b = by_key(two[split]), by_key(one[split])
        assert sorted(a) == sorted(b) and len(a) == len(two[split])  # disjoint, nothing missing
        for key in b:
            for field in ("image", "mask", "cone"):
                np.testing.assert_array_equal(a[key][field], b[key][field], err_msg=f"{key} {field}")
            assert a[key]["prompts"] == b[key]["prompts"]


def test_synth_bad_inputs_are_clear_errors(setup, tmp_path, capsys):
    corpus, run, reference = setup
    with pytest.raises(ValueError, match="holds another corpus"):
        synth.generate(run, corpus, reference, **{**OPTS, "seed": 8})
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"trainer": "unet_seg", "model_name": "unet"}))
    with pytest.raises(ValueError, match="not an SDM run"):
        synth.generate(other, corpus, tmp_path / "o1", **OPTS)
    with pytest.raises(FileNotFoundError, match="not a jaxboost SDM run"):
        synth.generate(tmp_path, corpus, tmp_path / "o2", **OPTS)
    three = tmp_path / "three_labels"
    shutil.copytree(run, three)
    cfg = json.loads((three / "config.json").read_text())
    cfg["model"]["num_labels"] = 3
    (three / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_labels=3"):
        synth.generate(three, corpus, tmp_path / "o3", **OPTS)
    bigger = phantom_corpus(tmp_path / "c32", patients=2, size=32)
    with pytest.raises(ValueError, match="32 px"):
        synth.generate(run, bigger, tmp_path / "o4", **OPTS)
    with pytest.raises(ValueError, match="no synthetic test split"):
        synth.generate(run, corpus, tmp_path / "o5", **{**OPTS, "splits": ("train", "test")})
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_guidance_with_a_model_trained_without_dropout_warns(setup, tmp_path, capsys):
    corpus, run, _ = setup
    config = tiny_config(corpus, **{"diffusion.cond_drop_prob": 0.0})
    sdm_train.warn_unguided_training(config, 1.5)
    assert "trained without label dropout" in capsys.readouterr().out
    sdm_train.warn_unguided_training(tiny_config(corpus), 1.5)  # cond_drop_prob 0.2: silent
    assert "trained without" not in capsys.readouterr().out


class _FakeOutput:
    def __init__(self, ready: bool):
        self.ready = ready

    def is_ready(self) -> bool:
        return self.ready


def test_idle_clock_counts_the_gap_after_a_finished_call(monkeypatch):
    """Device idle = from the last time the newest call was seen queued/running to the next dispatch, only
    when that call had finished by then (closed form on a scripted clock)."""
    now = [0.0]
    monkeypatch.setattr(synth.time, "perf_counter", lambda: now[0])
    stats = synth.HostStats()
    clock = synth._IdleClock(stats)
    first = _FakeOutput(ready=False)
    clock.dispatched(first, started=0.0)       # t=0: call 0 queued
    now[0] = 2.0
    clock.seen()                               # t=2: still running
    now[0] = 3.0
    first.ready = True
    second = _FakeOutput(ready=False)
    clock.dispatched(second, started=3.0)      # t=3: call 0 done -> idle at most 3 - 2
    now[0] = 5.0
    clock.dispatched(_FakeOutput(False), 5.0)  # call 1 still running at dispatch: no idle
    stats.seconds = 5.0
    assert stats.idle_seconds == 1.0 and stats.idle_fraction == 0.2


def test_background_stage_is_bounded_and_writes_in_order():
    import threading
    release, written, peak = threading.Event(), [], [0]
    stage = synth._BackgroundStage(written.append, workers=2, depth=2)

    def job(i):
        release.wait(5)
        return i
    stage.submit(job, 0)
    stage.submit(job, 1)
    peak[0] = len(stage._queue)
    release.set()
    for i in range(2, 6):
        stage.submit(job, i)
        assert len(stage._queue) <= 2
    stage.drain()
    stage.close()
    assert peak[0] == 2 and written == [0, 1, 2, 3, 4, 5]


def test_batch_model_labels_are_sdm_labels_of_each_row_and_name_a_bad_one():
    rng = np.random.default_rng(0)
    maps = np.stack([rng.integers(0, 4, (3, 16, 16)), rng.integers(0, 2, (3, 16, 16))], -1).astype(np.uint8)
    got = synth.batch_model_labels(maps, labels_lib.NUM_SDM_LABELS, lambda i: f"row{i}")
    assert got.dtype == np.uint8
    assert np.array_equal(got, np.stack([labels_lib.sdm_labels(m[..., 0], m[..., 1], is_cone=True) for m in maps]))
    assert np.array_equal(synth.batch_model_labels(maps, labels_lib.NUM_CAMUS_LABELS, str), maps[..., 0])
    maps[1, 3, 4, 0] = 7
    with pytest.raises(ValueError, match="row1: mask label 7 is outside CAMUS labels 0-3"):
        synth.batch_model_labels(maps, labels_lib.NUM_SDM_LABELS, lambda i: f"row{i}")


def test_sample_keys_of_a_whole_split_are_those_of_each_sample():
    # All of a split's keys are made in chunks of KEY_CHUNK (padded): each is still fold_in of its own index.
    indices = np.arange(synth.KEY_CHUNK + 37) * 3 + 1
    got = synth.sample_keys(5, 1, indices)
    base = jax.random.fold_in(jax.random.key(5), 1)
    for i in (0, 1, synth.KEY_CHUNK - 1, synth.KEY_CHUNK, len(indices) - 1):
        assert np.array_equal(got[i], jax.random.key_data(jax.random.fold_in(base, int(indices[i]))))
    assert np.array_equal(synth.sample_keys(5, 1, indices[:3]), got[:3])

"""Triplet corpus: record contract, counts, resumable builds (SIGKILL + rerun), multi-writer, bad input, show."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxboost.data import camus, corpus, labels, phantom, prompts

SMALL = (48, 40)
SIZE = 32


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    return phantom.write_phantom(tmp_path_factory.mktemp("phantom"), patients=6, seed=2, fmt="nii", size=SMALL)


@pytest.fixture(scope="module")
def built(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c"
    items, info = corpus.camus_items(phantom_dir, size=SIZE, source="phantom")
    corpus.build_corpus(items, out, size=SIZE, source="phantom", records_per_shard=10, source_info=info)
    return out


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "jaxboost.cli", *args], capture_output=True, text=True, **kwargs)


def test_counts_per_split_and_record_contract(built, phantom_dir):
    c = corpus.open_corpus(built, verify=True)
    # 6 patients: 1 test, of 5 training 1 val; 4 images x 3 structures each.
    assert c.manifest["counts"] == {"train": 48, "val": 12, "test": 12}
    assert [c.split_len(s) for s in corpus.SPLITS] == [48, 12, 12] and c.size == SIZE
    record = next(c.iter("val"))
    assert record["key"] == "phantom/patient0001_2CH_ED/LV"
    for name in ("image", "mask", "cone"):
        assert record[name].shape == (SIZE, SIZE) and record[name].dtype == np.uint8
    assert record["orig_mask"].shape == SMALL
    assert (record["structure"], record["label"], record["split"], record["source"]) == ("LV", 1, "val", "phantom")
    source_rec = camus.read_camus(phantom_dir)[0]
    _, orig = source_rec.load()
    np.testing.assert_array_equal(record["orig_mask"], orig)
    assert (record["sex"], record["age"], record["quality"]) == (source_rec.sex, source_rec.age, source_rec.quality)
    assert record["prompts"] == prompts.make_prompts("LV", "2CH", "ED", source_rec.sex, source_rec.age,
                                                     source_rec.quality, prompts.mask_shape(orig == 1))
    assert len(record["prompts"]) == 8 and all(len(p) == 2 for p in record["prompts"])
    # The cone derived from the image is the phantom's scan sector.
    sector = corpus.resize(phantom.sector_cone(*SMALL), SIZE, True)
    assert (record["cone"] != sector).mean() < 0.03
    assert set(np.unique(record["mask"])) <= {0, 1, 2, 3}


def test_keys_unique_and_patients_never_in_two_splits(built):
    c = corpus.open_corpus(built)
    keys, split_of = set(), {}
    for split in corpus.SPLITS:
        for record in c.iter(split):
            assert record["key"] not in keys
            keys.add(record["key"])
            assert split_of.setdefault(record["patient"], split) == split
    assert len(keys) == 72


def test_encode_decode_roundtrip():
    record = {"key": "x", "image": np.arange(12, dtype=np.uint8).reshape(3, 4), "f": np.ones((2,), np.float32),
              "prompts": [["a", "b"]] * 8, "age": np.int64(7), "empty": np.zeros((0, 0), np.uint8)}
    back = corpus.decode_record(corpus.encode_record(record))
    np.testing.assert_array_equal(back["image"], record["image"])
    assert back["f"].dtype == np.float32 and back["age"] == 7 and back["prompts"] == record["prompts"]
    assert back["empty"].shape == (0, 0)
    meta = corpus.decode_record(corpus.encode_record(record), arrays=False)
    assert set(meta) == {"key", "prompts", "age"}


def test_killed_build_resumes_to_the_same_manifest(phantom_dir, tmp_path):
    args = ["corpus", "build", "--camus", str(phantom_dir), "--size", str(SIZE), "--records-per-shard", "6"]
    ref = tmp_path / "ref"
    assert _cli(*args, "--out", str(ref)).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jaxboost.cli", *args, "--out", str(out),
                             "--sleep-per-image", "0.15"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.array_record"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.glob("*.array_record"))
    assert 2 <= len(finished) < len(json.loads((ref / "manifest.json").read_text())["shards"])
    mtimes = {name: (out / name).stat().st_mtime_ns for name in finished}
    result = _cli(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").read_text() == (ref / "manifest.json").read_text()
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == mtimes  # complete shards kept
    assert not list(out.glob("*.tmp"))
    corpus.open_corpus(out, verify=True)
    assert _cli(*args, "--out", str(ref)).returncode == 0  # rerunning a finished build changes nothing
    assert (ref / "manifest.json").read_text() == (out / "manifest.json").read_text()


def test_two_writers_merge_into_one_corpus(phantom_dir, built, tmp_path):
    out = tmp_path / "multi"
    items, info = corpus.camus_items(phantom_dir, size=SIZE, source="phantom")
    for writer_id in (0, 1):
        assert corpus.build_corpus(items, out, size=SIZE, source="phantom", writer_id=writer_id, num_writers=2,
                                   records_per_shard=10) is None
    with pytest.raises(ValueError, match="expected 3 writer parts, found 2"):
        corpus.finalize_corpus(out, expect_writers=3)
    result = _cli("corpus", "build", "--camus", str(phantom_dir), "--out", str(out), "--size", str(SIZE),
                  "--num-writers", "2", "--finalize")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["writer"] for s in manifest["shards"]} == {0, 1}
    single = corpus.open_corpus(built)
    assert manifest["counts"] == single.manifest["counts"]
    merged = corpus.open_corpus(out)
    for split in corpus.SPLITS:
        assert sorted(r["key"] for r in merged.iter(split)) == sorted(r["key"] for r in single.iter(split))


def test_corpus_writer_for_synthetic_records(tmp_path):
    """The API the SDM sampler uses: make_records(..., source='synthetic', drop_quality=True) + CorpusWriter."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:20, 10:22], mask[20:26, 10:22] = 1, 3
    image = np.full((SIZE, SIZE), 90, np.uint8)
    writer = corpus.CorpusWriter(tmp_path / "syn", size=SIZE, source="synthetic", records_per_shard=4)
    for i in range(3):
        for record in corpus.make_records(image, mask, name=f"patient0001_2CH_ED_aug{i}", patient="patient0001",
                                          view="2CH", phase="ED", sex="M", age=60, quality=None, split="train",
                                          source="synthetic", size=SIZE, cone=np.ones_like(mask),
                                          drop_quality=True, keep_orig_mask=False):
            writer.add(record)
    writer.close()
    manifest = corpus.finalize_corpus(tmp_path / "syn")
    assert manifest["counts"]["train"] == 9 and [s["records"] for s in manifest["shards"]] == [4, 4, 1]
    # build_corpus takes plain records too and, given the same records, rebuilds the same corpus.
    records = [r for i in range(3) for r in corpus.make_records(
        image, mask, name=f"patient0001_2CH_ED_aug{i}", patient="patient0001", view="2CH", phase="ED", sex="M",
        age=60, quality=None, split="train", source="synthetic", size=SIZE, cone=np.ones_like(mask),
        drop_quality=True, keep_orig_mask=False)]
    again = corpus.build_corpus(iter(records), tmp_path / "syn2", size=SIZE, source="synthetic", records_per_shard=4)
    assert again["shards"] == manifest["shards"]
    with pytest.raises(ValueError, match="given 12 train records but its shards hold 9; the input changed"):
        corpus.build_corpus(iter(records + records[:3]), tmp_path / "syn2", size=SIZE, source="synthetic",
                            records_per_shard=4)
    record = corpus.open_corpus(tmp_path / "syn").source("train")[4]
    assert record["key"] == "synthetic/patient0001_2CH_ED_aug1/MYO" and record["orig_mask"].size == 0
    assert "quality" not in record["prompts"][6][0]


def test_folder_with_another_corpus_or_other_files_is_refused(phantom_dir, built, tmp_path):
    items, _ = corpus.camus_items(phantom_dir, size=16, source="phantom")
    with pytest.raises(ValueError, match=r"holds another corpus .*size"):
        corpus.build_corpus(items, built, size=16, source="phantom", records_per_shard=10)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"stuff: not empty and not a jaxboost corpus"):
        corpus.CorpusWriter(tmp_path / "stuff", size=SIZE, source="phantom")


def test_wrong_schema_version_and_corrupt_shard_are_named(built, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ValueError, match=shard.name + ": sha256"):
        corpus.open_corpus(copy, verify=True)
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: schema_version 99 is not supported"):
        corpus.open_corpus(copy)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        corpus.open_corpus(tmp_path)


def test_bad_source_stops_build_without_manifest(tmp_path):
    root = phantom.write_phantom(tmp_path / "p", patients=2, seed=0, fmt="nii", size=SMALL)
    gt = root / "testing/patient0002/patient0002_4CH_ES_gt.nii.gz"
    mask = camus.read_image(gt)
    mask[3, 3] = 9
    phantom.write_image(gt.with_name("patient0002_4CH_ES_gt"), mask, "nii")
    result = _cli("corpus", "build", "--camus", str(root), "--out", str(tmp_path / "c"), "--size", str(SIZE))
    assert result.returncode != 0 and "patient0002_4CH_ES_gt.nii.gz: mask labels" in result.stderr
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert not list((tmp_path / "c").glob("*.tmp")) and not list((tmp_path / "c").glob("test-*"))


def test_corpus_show_prints_counts_and_draws_grid(built, tmp_path):
    from jaxboost.data import corpus_show
    summary = corpus_show.summarize(corpus.open_corpus(built), n_examples=3)
    assert summary["by_split"]["train"]["structure"] == {"LA": 16, "LV": 16, "MYO": 16}
    assert summary["by_split"]["test"]["patients"] == 1 and len(summary["examples"]) == 3
    png = tmp_path / "grid.png"
    result = _cli("corpus", "show", str(built), "--png", str(png), "--n", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout[: result.stdout.rindex("}") + 1])["counts"]["val"] == 12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overlay = corpus_show.overlay(np.zeros((4, 4), np.uint8), np.eye(4, dtype=np.uint8), label=1)
    assert overlay.shape == (4, 4, 3) and overlay[0, 0, 0] > overlay[0, 0, 1]

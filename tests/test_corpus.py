"""Triplet corpus: record contract, counts, resumable builds (SIGKILL + rerun), multi-writer, bad input, show."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxboost import plots
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


def _synthetic_images(n: int, size: int = SIZE) -> list[dict]:
    """n synthetic image entries whose mask has LV and LA but no myocardium."""
    mask = np.zeros((size, size), np.uint8)
    mask[8:20, 10:22], mask[20:26, 10:22] = 1, 3
    image = (np.arange(size * size) % 251).astype(np.uint8).reshape(size, size)
    return [corpus.make_image(image, mask, name=f"patient0001_2CH_ED_aug{i}", patient="patient0001", view="2CH",
                              phase="ED", sex="M", age=60, quality=None, split="train", source="synthetic",
                              size=size, cone=np.ones_like(mask), drop_quality=True, keep_orig_mask=False)
            for i in range(n)]


def test_corpus_writer_for_synthetic_images_skips_empty_structures(tmp_path):
    """The API the SDM sampler uses (make_image + CorpusWriter.add_image): one entry per image, a record per
    structure present; the empty myocardium gets no record claiming it is there."""
    writer = corpus.CorpusWriter(tmp_path / "syn", size=SIZE, source="synthetic", records_per_shard=4)
    for entry in _synthetic_images(3):
        writer.add_image(entry)
    writer.close()
    manifest = corpus.finalize_corpus(tmp_path / "syn")
    # records_per_shard=4 -> 2 images per shard; 2 records per image (LV, LA).
    assert manifest["counts"]["train"] == 6 and manifest["images"]["train"] == 3
    assert [(s["images"], s["records"]) for s in manifest["shards"]] == [(2, 4), (1, 2)]
    assert manifest["shards"][0]["absent"] == [[0, "MYO"], [1, "MYO"]]
    c = corpus.open_corpus(tmp_path / "syn", verify=True)
    assert [r["key"] for r in c.iter("train")] == [f"synthetic/patient0001_2CH_ED_aug{i}/{s}"
                                                   for i in range(3) for s in ("LV", "LA")]
    record = c.source("train")[3]
    assert record["key"] == "synthetic/patient0001_2CH_ED_aug1/LA" and record["label"] == 3
    assert record["orig_mask"].size == 0 and "quality" not in record["prompts"][6][0]
    assert record["prompts"][6][0].startswith("Left atrium cavity of ")
    # build_corpus takes records too (grouped by image) and, given the same records, rebuilds the same shards.
    records = [r for entry in _synthetic_images(3) for r in corpus.image_records(entry)]
    again = corpus.build_corpus(iter(records), tmp_path / "syn2", size=SIZE, source="synthetic", records_per_shard=4)
    assert again["shards"] == manifest["shards"]
    with pytest.raises(ValueError, match="given 4 train images but its shards hold 3; the input changed"):
        corpus.build_corpus(iter(records + records[:2]), tmp_path / "syn2", size=SIZE, source="synthetic",
                            records_per_shard=4)


def test_image_mask_and_cone_are_stored_once_per_image(built):
    """Each shard entry is one image (its three records refer to it): entries == images, records == 3 x images
    (the phantom's masks hold every structure), and the stored payload is well under storing the image, mask
    and cone in every record."""
    from array_record.python import array_record_module
    c = corpus.open_corpus(built)
    raw = []
    for shard in c.manifest["shards"]:
        reader = array_record_module.ArrayRecordReader(str(built / shard["file"]))
        raw += reader.read(list(range(reader.num_records())))
        reader.close()
    assert len(raw) == c.num_images() == 24 and c.manifest["num_records"] == 72
    entry = corpus.decode_record(raw[0])
    assert entry["image"].shape == (SIZE, SIZE) and sorted(entry["prompts"]) == ["LA", "LV", "MYO"]
    assert c.num_bytes() == sum((built / s["file"]).stat().st_size for s in c.manifest["shards"])
    per_record = sum(len(corpus.encode_record(r)) for s in corpus.SPLITS for r in c.iter(s))  # one per record
    assert sum(map(len, raw)) < 0.75 * per_record


def _encode_schema1(record: dict) -> bytes:
    """A record as schema 1 encoded it: msgpack, arrays as {__nd__, dtype, shape, zlib data}, no codec field."""
    import msgpack
    import zlib
    return msgpack.packb({k: ({"__nd__": True, "dtype": v.dtype.str, "shape": list(v.shape),
                               "data": zlib.compress(v.tobytes(), 1)} if isinstance(v, np.ndarray) else v)
                          for k, v in record.items()}, use_bin_type=True)


def _write_schema1_corpus(root, records: list[dict]) -> None:
    """A corpus as jaxboost wrote it before schema 2: one ArrayRecord entry per record, a v1 manifest."""
    import hashlib
    from array_record.python import array_record_module
    root.mkdir()
    shard = root / "train-w000-00000.array_record"
    writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
    for record in records:
        writer.write(_encode_schema1(record))
    writer.close()
    manifest = {"format": corpus.FORMAT_NAME, "schema_version": 1, "size": SIZE, "num_records": len(records),
                "config": {}, "counts": {"train": len(records), "val": 0, "test": 0}, "source": {},
                "shards": [{"file": shard.name, "split": "train", "writer": 0, "records": len(records),
                            "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}]}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_schema1_corpus_still_reads(built, tmp_path):
    from jaxboost.data import corpus_show, pipeline
    records = list(corpus.open_corpus(built).iter("val"))
    _write_schema1_corpus(tmp_path / "v1", records)
    old = corpus.open_corpus(tmp_path / "v1", verify=True)
    assert old.schema_version == 1 and old.num_images() == len(records) == 12
    got = list(old.iter("train"))
    assert [r["key"] for r in got] == [r["key"] for r in records]
    for a, b in zip(got, records):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["prompts"] == b["prompts"] and a["mask"].shape == b["mask"].shape
    assert old.source("train").indices_of_structure("LV") is None  # schema 1: the loader scans
    assert pipeline._kept_indices(old.source("train"), pipeline.sdm_filter) == [0, 3, 6, 9]
    assert corpus_show.summarize(old, 1)["images"] == 12


def test_sdm_filter_comes_from_the_manifest_without_reading(built, monkeypatch):
    from jaxboost.data import pipeline
    source = corpus.open_corpus(built).source("train")
    scanned = [i for i, r in enumerate(source.iter_sequential(arrays=False)) if r["structure"] == "LV"]

    def no_scan(*args, **kwargs):
        raise AssertionError("the filter read the records")
    monkeypatch.setattr(corpus.CorpusSource, "iter_sequential", no_scan)
    monkeypatch.setattr(corpus.CorpusSource, "_read", no_scan)
    assert pipeline._kept_indices(source, pipeline.sdm_filter) == scanned and len(scanned) == 16


def test_open_readers_are_bounded(built, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_OPEN_READERS", 2)
    source = corpus.open_corpus(built).source("train")
    assert len(source._shards) >= 4
    keys = [source[i]["key"] for i in range(len(source))]
    assert len(source._readers) == 2
    assert keys == [r["key"] for r in corpus.open_corpus(built).iter("train")]


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
    assert manifest["schema_version"] == corpus.SCHEMA_VERSION == 2
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
    shown = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert shown["counts"]["val"] == 12 and (shown["records"], shown["images"]) == (72, 24)
    on_disk = sum(p.stat().st_size for p in built.glob("*.array_record"))
    assert shown["bytes_per_triplet"] == pytest.approx(on_disk / 72)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overlay = plots.overlay(np.zeros((4, 4), np.uint8), np.eye(4, dtype=np.uint8))  # label 1: LV, red
    assert overlay.shape == (4, 4, 3) and overlay[0, 0, 0] > overlay[0, 0, 1] and not overlay[0, 1].any()


def _copy(built, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


def test_corpus_verify_names_every_bad_shard(built, tmp_path):
    copy, manifest = _copy(built, tmp_path)
    ok = _cli("corpus", "verify", str(copy))
    assert ok.returncode == 0 and f"{len(manifest['shards'])} shards, 72 records verified" in ok.stdout
    flipped, truncated = (copy / manifest["shards"][i]["file"] for i in (1, 4))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:700])
    bad = _cli("corpus", "verify", str(copy))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    named = [line for line in bad.stderr.splitlines() if "bad shard" in line]
    assert len(named) == 2 and flipped.name in named[0] and truncated.name in named[1]


def test_truncated_or_bit_flipped_shard_read_names_the_file(built, tmp_path):
    copy, manifest = _copy(built, tmp_path)
    shard = copy / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(ValueError, match=f"{shard.name}: unreadable"):
        list(corpus.open_corpus(copy).iter("train"))
    result = _cli("corpus", "show", str(copy))
    assert result.returncode == 2 and shard.name in result.stderr and "Traceback" not in result.stderr
    shutil_copy = built / manifest["shards"][0]["file"]
    data = bytearray(shutil_copy.read_bytes())
    data[200:260] = bytes(60)  # zero a run inside the first entry's chunk
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name}: unreadable"):
        corpus.open_corpus(copy).source("train")[0]


def test_manifest_with_wrong_counts_or_a_list_is_one_clear_line(built, tmp_path):
    copy, manifest = _copy(built, tmp_path)
    manifest["counts"]["train"] += 5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = _cli("corpus", "show", str(copy))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "manifest.json: counts['train'] is 53 but its shards hold 48 records" in result.stderr
    (copy / "manifest.json").write_text(json.dumps([manifest]))
    result = _cli("corpus", "show", str(copy))
    assert result.returncode == 2 and "manifest.json: expected a JSON object" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_constant_image_is_refused_for_real_data_and_warned_for_synthetic(caplog):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:10, 4:10] = 1
    args = dict(patient="p1", view="2CH", phase="ED", sex="F", age=50, quality="Good", split="train", size=SIZE)
    with pytest.raises(ValueError, match="p1_2CH_ED: the image is constant"):
        corpus.make_image(np.zeros_like(mask), mask, name="p1_2CH_ED", source="camus", **args)
    with caplog.at_level("WARNING"):
        entry = corpus.make_image(np.zeros_like(mask), mask, name="s_aug0", source="synthetic",
                                  cone=np.ones_like(mask), **args)
    assert "s_aug0: the image is constant" in caplog.text and entry["structures"] == ["LV"]


def test_build_with_size_7_is_refused_before_writing(phantom_dir, tmp_path):
    result = _cli("corpus", "build", "--camus", str(phantom_dir), "--out", str(tmp_path / "c"), "--size", "7")
    assert result.returncode == 2 and "--size 7: the corpus size must be a multiple of 8" in result.stderr
    assert not (tmp_path / "c").exists()


def test_show_n0_prompt_variant_and_closed_pipe(built, tmp_path, monkeypatch):
    from jaxboost.data import corpus_show
    counts_only = _cli("corpus", "show", str(built), "--n", "0")
    assert counts_only.returncode == 0 and "examples" not in counts_only.stdout and "72 records" in counts_only.stdout
    refused = _cli("corpus", "show", str(built), "--n", "0", "--png", str(tmp_path / "g.png"))
    assert refused.returncode == 2 and "--n 0: must be >= 1 with --png" in refused.stderr
    # The printed example prompt is the one drawn in the grid.
    drawn = []
    monkeypatch.setattr("matplotlib.axes.Axes.text", lambda self, x, y, s, **k: drawn.append(s))
    corpus_show.draw_grid(corpus.open_corpus(built), str(tmp_path / "g.png"), n=1, split="train")
    first = next(corpus.open_corpus(built).iter("train"))
    assert drawn[0].replace("\n", " ") == first["prompts"][7][0]
    printed = _cli("corpus", "show", str(built), "--n", "1").stdout.splitlines()
    assert printed[-1] == f"  {first['key']}: {first['prompts'][7][0]}"
    # `corpus show --json | head`: the reader went away (here: before the first write); no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = subprocess.run([sys.executable, "-m", "jaxboost.cli", "corpus", "show", str(built), "--json"],
                            stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert closed.returncode == 0 and closed.stderr == ""


@pytest.mark.slow
def test_scale_run_killed_and_resumed_loses_and_duplicates_nothing(tmp_path):
    """benchmarks.corpus_scale at a small size: 1 and 2 writer processes, each SIGKILLed midway and resumed;
    the corpus verifies, holds every key exactly once and reads back whole through the training loader."""
    from benchmarks import corpus_scale
    results = corpus_scale.run_scale(tmp_path, 3000, writer_counts=(1, 2), records_per_shard=150,
                                     sleep_per_image=0.004, timeout=120)
    for r in results:
        assert 0 < r["shards_before_kill"] < r["shards"] == 20  # killed midway, not before or after
        assert (r["records"], r["images"], r["loader_records"]) == (3000, 1000, 2816)  # 11 full batches of 256
        assert r["bytes_per_triplet"] > 0

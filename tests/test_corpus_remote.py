"""A corpus on a non-local filesystem: gs:// served in-process by an fsspec in-memory filesystem, reached
through etils.epath's fsspec backend (the code path a real gs:// bucket takes), with no local path in
between: shards staged locally, uploaded when finished, read back through a local cache."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend

from jaxboost.data import corpus
sys.path.insert(0, str(Path(__file__).parent))
from test_corpus import SIZE, _synthetic_images  # noqa: E402
import gcs_fake  # noqa: E402

fsspec_registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its mapping)


# gs://bucket/... kept in this process's memory (paths without a leading slash, as gcsfs gives them, so
# epath's glob rebuilds gs:// URIs); the fixture clears it for each test.
_InMemoryBucket = gcs_fake.InMemoryGCS


@pytest.fixture
def bucket(monkeypatch):
    saved = {name: fsspec_registry._registry.get(name) for name in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec_registry.register_implementation(name, _InMemoryBucket, clobber=True)
    _InMemoryBucket.store.clear()
    _InMemoryBucket.pseudo_dirs[:] = [""]
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    real_open = open

    def local_only_open(file, *args, **kwargs):  # a corpus path must never reach a POSIX open
        assert "gs:/" not in str(file), f"POSIX open() of a corpus path: {file}"
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", local_only_open)
    yield epath.Path("gs://bucket/corpora")
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    for name, cls in saved.items():
        if cls is None:
            fsspec_registry._registry.pop(name, None)
        else:
            fsspec_registry._registry[name] = cls


def _write(out, entries, writer_id=0, records_per_shard=4, stop_after=None):
    writer = corpus.CorpusWriter(out, size=SIZE, source="synthetic", writer_id=writer_id,
                                 records_per_shard=records_per_shard)
    for n, entry in enumerate(entries):
        if stop_after is not None and n == stop_after:
            return writer  # "killed": the open shard is never finished
        writer.add_image(entry)
    writer.close()
    return writer


def test_a_gs_corpus_is_written_resumed_verified_and_read_like_a_local_one(bucket, tmp_path):
    entries = _synthetic_images(7)
    local = tmp_path / "local"
    _write(local, entries)
    want = corpus.finalize_corpus(local)

    out = bucket / "syn"
    _write(out, entries, stop_after=5)  # killed after 2 finished shards (2 images each) and half a third
    assert sorted(p.name for p in out.glob("*.array_record")) == [
        "train-w000-00000.array_record", "train-w000-00001.array_record"]
    _write(out, entries)  # the rerun skips the listed shards and writes the rest
    manifest = corpus.finalize_corpus(out)
    assert manifest["shards"] == want["shards"]  # same bytes (sha256), counts and absent lists as on disk
    assert str(out / "manifest.json") in {"gs://" + k for k in _InMemoryBucket.store}

    opened = corpus.open_corpus(str(out), verify=True)
    assert opened.verify() == []
    source = opened.source("train")
    assert len(source) == want["counts"]["train"]
    expected = corpus.open_corpus(local).source("train")
    for i in (0, 5, len(source) - 1):
        got, ref = source[i], expected[i]
        assert got["key"] == ref["key"] and np.array_equal(got["image"], ref["image"])
        assert got["prompts"] == ref["prompts"]


def test_two_writers_on_gs_merge_into_one_manifest(bucket):
    entries = _synthetic_images(6)
    out = bucket / "two"
    for writer_id in (0, 1):  # writer w takes images w, w + 2, ... (as build_corpus with num_writers=2)
        _write(out, entries[writer_id::2], writer_id=writer_id)
    manifest = corpus.finalize_corpus(out, expect_writers=2)
    assert {s["writer"] for s in manifest["shards"]} == {0, 1} and manifest["counts"]["train"] == 12
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["writer-000.json", "writer-001.json"]
    assert corpus.open_corpus(out).verify() == []


def test_a_damaged_gs_shard_is_named_by_verify(bucket):
    out = bucket / "bad"
    _write(out, _synthetic_images(4))
    corpus.finalize_corpus(out)
    (out / "train-w000-00001.array_record").write_bytes(b"not an array record")
    problems = corpus.open_corpus(out).verify()
    assert problems == [f"{out}/train-w000-00001.array_record: sha256 does not match manifest.json "
                        "(corrupt or replaced shard)"]

"""A corpus at scale through the write/read path, no model: rows `corpus_scale ...`.

Writes N triplets (default 1,000,000) at 64 px as schema-2 shards from a pool of phantom images (each image
made distinct by a roll of its pixels, so no two entries are the same bytes), kills the writer with SIGKILL
midway, resumes it, finalizes, verifies every shard's hash and count, checks that every key is there exactly
once, and reads the corpus back through the training loader (grain, `pipeline.make_loader`). Then the same
with 4 writer processes, each killed and resumed. Reports build and read throughput and bytes per triplet.

  python -m benchmarks.corpus_scale --triplets 1000000 --out DIR      (the README figures; ~1-2 GB of disk)
  python -m benchmarks.run --cases corpus_scale                        (the same, 1M triplets)
  python -m benchmarks.run --quick --cases corpus_scale                (30,000 triplets)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 64
RECORDS_PER_SHARD = 3072  # 1024 images
POOL_PATIENTS = 6


def _pool(size: int) -> list[dict]:
    """Image entries of a small phantom (every mask holds the three structures)."""
    from jaxboost.data import corpus as corpus_lib
    from jaxboost.data import phantom
    with tempfile.TemporaryDirectory() as tmp:
        source = phantom.write_phantom(Path(tmp), patients=POOL_PATIENTS, seed=0, size=(size, size))
        items, _ = corpus_lib.camus_items(source, size=size, source="phantom")
        pool = [load() for _, load in items]
    assert all(len(e["structures"]) == 3 for e in pool)
    return pool


def scale_entries(images: int, size: int = SIZE, writer_id: int = 0, num_writers: int = 1):
    """Entry i: pool image i % P, its pixels rolled by i // P columns, split train, key phantom/scale{i}.
    Entries of other writers (i % num_writers != writer_id), which build_corpus passes over, are not made."""
    pool = _pool(size)
    for i in range(images):
        base = pool[i % len(pool)]
        if i % num_writers != writer_id:
            yield base
            continue
        shift = (i // len(pool)) % size
        yield {**base, "key": f"phantom/scale{i:08d}", "image": np.roll(base["image"], shift, axis=1),
               "split": "train", "patient": f"scale{i % 1000:04d}"}


def write(out: str, images: int, writer_id: int, num_writers: int, records_per_shard: int,
          sleep_per_image: float = 0.0) -> None:
    """One writer process: its share of the entries (resumable); sleep_per_image slows it (tests kill it)."""
    from jaxboost.data import corpus as corpus_lib
    entries = scale_entries(images, writer_id=writer_id, num_writers=num_writers)
    if sleep_per_image:
        entries = (time.sleep(sleep_per_image) or e for e in entries)
    corpus_lib.build_corpus(entries, out, size=SIZE, source="phantom", writer_id=writer_id,
                            num_writers=num_writers, records_per_shard=records_per_shard,
                            extra_config={"benchmark": "corpus_scale", "images": images}, finalize=False)


def _finished_shards(out: Path) -> int:
    total = 0
    for part in (out / "parts").glob("writer-*.json"):
        try:
            total += len(json.loads(part.read_text())["shards"])
        except (json.JSONDecodeError, KeyError):
            pass  # being replaced right now
    return total


def _writers(out: Path, images: int, num_writers: int, records_per_shard: int,
             sleep_per_image: float) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "benchmarks.corpus_scale", "--write", str(out), "--images", str(images),
           "--num-writers", str(num_writers), "--records-per-shard", str(records_per_shard),
           "--sleep-per-image", str(sleep_per_image)]
    return [subprocess.Popen(cmd + ["--writer-id", str(w)]) for w in range(num_writers)]


def build_killed_and_resumed(out: Path, images: int, num_writers: int, timeout: float,
                             records_per_shard: int = RECORDS_PER_SHARD, sleep_per_image: float = 0.0) -> dict:
    """Write with `num_writers` processes, SIGKILL them all once half the shards are finished, rerun to the end."""
    per_writer = -(-images // num_writers)
    shards = num_writers * -(-per_writer // -(-records_per_shard // 3))
    start = time.perf_counter()
    procs = _writers(out, images, num_writers, records_per_shard, sleep_per_image)
    while _finished_shards(out) < shards // 2 and any(p.poll() is None for p in procs):
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"corpus_scale: {out} not half written in {timeout:.0f}s")
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    killed_at, finished_before = time.perf_counter() - start, _finished_shards(out)
    resume = time.perf_counter()
    for p in _writers(out, images, num_writers, records_per_shard, 0.0):
        if p.wait(timeout=timeout) != 0:
            raise RuntimeError(f"corpus_scale: a resumed writer of {out} failed")
    from jaxboost.data import corpus as corpus_lib
    manifest = corpus_lib.finalize_corpus(out, expect_writers=num_writers)
    seconds = time.perf_counter() - start
    return {"writers": num_writers, "build_seconds": seconds, "killed_after_s": killed_at,
            "shards_before_kill": finished_before, "resume_seconds": time.perf_counter() - resume,
            "shards": len(manifest["shards"]), "records": manifest["num_records"], "images": manifest["num_images"],
            "bytes": manifest["bytes"], "bytes_per_triplet": manifest["bytes"] / manifest["num_records"],
            "build_triplets_per_s": manifest["num_records"] / seconds}


def check_and_read(out: Path, images: int, read_limit: int | None) -> dict:
    """Verify hashes and counts, every key once, then an epoch (or read_limit records) through make_loader."""
    from jaxboost.data import corpus as corpus_lib
    from jaxboost.data import pipeline
    corpus = corpus_lib.open_corpus(out)
    start = time.perf_counter()
    problems = corpus.verify()
    verify_s = time.perf_counter() - start
    assert not problems, problems
    start = time.perf_counter()
    keys = [r["key"] for r in corpus.iter("train", arrays=False)]
    keys_s = time.perf_counter() - start
    expected = {f"phantom/scale{i:08d}/{s}" for i in range(images) for s in ("LV", "MYO", "LA")}
    assert len(keys) == len(expected) and set(keys) == expected, "a triplet was lost or duplicated"
    batch = 256
    loader = pipeline.make_loader(out, "train", global_batch_size=batch, seed=0, shuffle=True, num_epochs=1,
                                  process_index=0, process_count=1)
    start, seen = time.perf_counter(), 0
    for host_batch in loader:
        seen += len(host_batch["key"])
        assert host_batch["image"].shape == (batch, SIZE, SIZE)
        if read_limit and seen >= read_limit:
            break
    read_s = time.perf_counter() - start
    return {"verify_seconds": verify_s, "key_check_seconds": keys_s, "loader_records": seen,
            "loader_seconds": read_s, "loader_records_per_s": seen / read_s}


def run_scale(root: Path, triplets: int, writer_counts=(1, 4), read_limit: int | None = None,
              timeout: float = 3600, records_per_shard: int = RECORDS_PER_SHARD, sleep_per_image: float = 0.0,
              keep: bool = False) -> list[dict]:
    images = -(-triplets // 3)
    results = []
    for num_writers in writer_counts:
        out = root / f"scale_w{num_writers}"
        shutil.rmtree(out, ignore_errors=True)
        result = build_killed_and_resumed(out, images, num_writers, timeout, records_per_shard, sleep_per_image)
        result.update(check_and_read(out, images, read_limit))
        results.append(result)
        print(json.dumps(result), flush=True)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)  # the next run reuses the disk
    return results


def run(quick: bool = False):
    from benchmarks.harness import Row
    triplets = 30_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("JAXBOOST_BENCH_TMP")) as tmp:
        results = run_scale(Path(tmp), triplets, read_limit=None if quick else 200_000)
    rows = []
    for r in results:
        tag = f"corpus_scale {triplets // 1000}k@{SIZE}px w{r['writers']}"
        rows.append(Row(case=f"{tag} build", impl="write (killed+resumed)", seconds=r["build_seconds"],
                        items_per_s=r["build_triplets_per_s"], note=f"{r['bytes_per_triplet']:.0f} B/triplet"))
        rows.append(Row(case=f"{tag} read", impl="make_loader", seconds=r["loader_seconds"],
                        items_per_s=r["loader_records_per_s"], note=f"{r['loader_records']} records"))
    return rows, {"results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help=argparse.SUPPRESS)  # a writer process of build_killed_and_resumed
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--writer-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--num-writers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sleep-per-image", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--records-per-shard", type=int, default=RECORDS_PER_SHARD)
    parser.add_argument("--triplets", type=int, default=1_000_000)
    parser.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--writers", default="1,4", help="writer process counts to run")
    parser.add_argument("--read-limit", type=int, default=None, help="records read through the loader")
    args = parser.parse_args()
    if args.write:
        write(args.write, args.images, args.writer_id, args.num_writers, args.records_per_shard,
              args.sleep_per_image)
        return
    root = Path(args.out or tempfile.mkdtemp())
    root.mkdir(parents=True, exist_ok=True)
    run_scale(root, args.triplets, tuple(int(w) for w in args.writers.split(",")), args.read_limit,
              records_per_shard=args.records_per_shard)


if __name__ == "__main__":
    main()

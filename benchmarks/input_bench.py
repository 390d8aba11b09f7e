"""Input pipeline: each loader's records/s against raw ArrayRecord read + decode of the same records, same run.

  python -m benchmarks.run --cases input [--quick]

A phantom corpus is built at 256 and 352 px (the SDM/MUMC and CLIPSeg sizes). `read+decode` reads the
records in a shuffled order straight from the corpus source; `loader` is `pipeline.make_loader` with the
host_uint8 transforms (the host only reads; casting, resizing, scaling and flips are `device_preprocess`
inside the step), batched, in the training process (data.workers=0: worker processes only add contention
on a 2-core machine). `loader (float32 x3 host)` is the same loader with the transforms computing on the
host, for comparison. The note gives loader rate / raw rate.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Row
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import phantom, pipeline

SIZES = (256, 352)
BATCH = 32


def _build_corpus(root: Path, size: int, patients: int) -> Path:
    src = root / "phantom"
    if not src.exists():
        phantom.write_phantom(src, patients, seed=0, size=(160, 128))
    out = root / f"corpus{size}"
    items, info = corpus_lib.camus_items(src, size=size, source="phantom")
    corpus_lib.build_corpus(items, out, size=size, source="phantom", source_info=info)
    return out


def _rate(fn, records: int, repeats: int = 3) -> float:
    """Best of `repeats` records/s of fn() (which handles `records` records): the least disturbed run."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return records / best


def raw_read_decode(corpus_dir: Path, records: int) -> float:
    source = corpus_lib.open_corpus(corpus_dir).source("train")
    order = np.random.default_rng(0).permutation(np.resize(np.arange(len(source)), records))

    def read():
        for i in order:
            rec = source[int(i)]
            assert rec["image"].dtype == np.uint8
    return _rate(read, records)


def loader_rate(corpus_dir: Path, records: int, transform) -> float:
    loader = pipeline.make_loader(corpus_dir, "train", global_batch_size=BATCH, seed=0, shuffle=True,
                                  num_epochs=None, transform=transform, process_index=0, process_count=1,
                                  worker_count=0)
    batches = records // BATCH

    def run():
        it = iter(loader)
        for _ in range(batches):
            next(it)
    return _rate(run, batches * BATCH)


def loaders(size: int) -> dict:
    """name -> (device-side transform, host-side transform) at `size` (the corpus is built at `size`)."""
    return {"segmentation": (pipeline.segmentation_transform(3, size, host_uint8=True),
                             pipeline.segmentation_transform(3, size)),
            "sdm": (pipeline.sdm_transform(size, host_uint8=True), pipeline.sdm_transform(size))}


def run(quick: bool = False):
    rows = []
    records = 256 if quick else 1024
    with tempfile.TemporaryDirectory(prefix="jaxboost-input-") as tmp:
        for size in SIZES:
            corpus_dir = _build_corpus(Path(tmp), size, patients=4 if quick else 6)
            raw = raw_read_decode(corpus_dir, records)
            for name, (device_side, host_side) in loaders(size).items():
                case = f"input/{name} {size}px"
                rows.append(Row(case, "read+decode", 1.0 / raw, raw, note="raw rate of the same records"))
                for impl, transform in (("loader", device_side), ("loader (float32 x3 host)", host_side)):
                    rate = loader_rate(corpus_dir, records, transform)
                    rows.append(Row(case, impl, 1.0 / rate, rate, note=f"{100 * rate / raw:.0f}% of raw"))
    return rows


if __name__ == "__main__":
    from benchmarks import harness
    print(harness.format_table(run(quick=True)))

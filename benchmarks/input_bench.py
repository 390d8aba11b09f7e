"""Input pipeline: each loader's records/s against raw ArrayRecord read + decode of the same records, same run.

  python -m benchmarks.run --cases input [--quick]

A phantom corpus is built at 256 and 352 px (the SDM/MUMC and CLIPSeg sizes). `read+decode` reads the
records in a shuffled order straight from the corpus source, one by one in the benchmark's thread;
`loader` is `pipeline.make_loader` with the host_uint8 transforms (the host only reads; casting, resizing,
scaling and flips are `device_preprocess` inside the step), batched, in the training process
(data.workers=0: worker processes only add contention on a 2-core machine; grain's 2 read threads do
the reading). `loader (float32 x3 host)` is the same loader with the transforms computing on the host, for
comparison. The note gives loader rate / raw rate. Raw reads and loaders take turns, best of several
rounds each, so a change in the shared machine's load hits both alike.
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


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def raw_read_decode(corpus_dir: Path, records: int):
    """() -> reads `records` records in a shuffled order straight from the corpus source, one by one."""
    source = corpus_lib.open_corpus(corpus_dir).source("train")
    order = np.random.default_rng(0).permutation(np.resize(np.arange(len(source)), records))

    def read():
        for i in order:
            rec = source[int(i)]
            assert rec["image"].dtype == np.uint8
    return read


def loader_run(corpus_dir: Path, records: int, transform):
    """() -> takes records // BATCH batches from a fresh iterator of the training loader."""
    loader = pipeline.make_loader(corpus_dir, "train", global_batch_size=BATCH, seed=0, shuffle=True,
                                  num_epochs=None, transform=transform, process_index=0, process_count=1,
                                  worker_count=0)

    def run():
        it = iter(loader)
        for _ in range(records // BATCH):
            next(it)
    return run


def interleaved_rates(runs: dict, records: int, repeats: int) -> dict:
    """name -> records/s, best of `repeats` rounds in which every run goes once, in turn: on a shared machine
    the load changes by the second, so each loader is compared with raw reads taken moments apart."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], _seconds(fn))
    return {name: records / t for name, t in best.items()}


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
            runs = {("", "read+decode"): raw_read_decode(corpus_dir, records)}
            for name, (device_side, host_side) in loaders(size).items():
                runs[(name, "loader")] = loader_run(corpus_dir, records, device_side)
                runs[(name, "loader (float32 x3 host)")] = loader_run(corpus_dir, records, host_side)
            rates = interleaved_rates(runs, (records // BATCH) * BATCH, repeats=3 if quick else 5)
            raw = rates.pop(("", "read+decode"))
            for name in loaders(size):
                case = f"input/{name} {size}px"
                rows.append(Row(case, "read+decode", 1.0 / raw, raw, note="raw rate of the same records"))
                for impl in ("loader", "loader (float32 x3 host)"):
                    rate = rates[(name, impl)]
                    rows.append(Row(case, impl, 1.0 / rate, rate, note=f"{100 * rate / raw:.0f}% of raw"))
    return rows


if __name__ == "__main__":
    from benchmarks import harness
    print(harness.format_table(run(quick=True)))

"""Host side of `jaxboost synth` with a near-free sampler: rows `synth_host <size>px` (images/s per host).

The sampler is replaced by a jitted function that turns the label maps into an image (no network), so the
figure is what the host pipeline (augmentation, label maps, shape words, prompts, encoding, writing) can
feed; a real run is bound by whichever of this and the device's sampling rate is lower, and prints how long
the device sat idle. Run: `python -m benchmarks.run --cases synth_host`.

An older commit's figure in the same conditions: `python -m benchmarks.synth_host --at feb8d59` exports that
commit (git archive) and times, in a child process on its code, the serial host loop its `synth.generate`
ran (per image: augment, label map, sample, make_records, write), with the same near-free sampler and
workload, then this tree's `measure`, one after the other; both after a warm-up (compiled programs), and
each prints its process CPU time per image (all threads), the figure the load does not inflate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Row
from jaxboost import synth
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import labels as labels_lib
from jaxboost.data import phantom

BATCH = 8


def _masks_corpus(root: Path, size: int, patients: int) -> corpus_lib.Corpus:
    source = phantom.write_phantom(root / "phantom", patients=patients, seed=0, size=(size, size))
    items, info = corpus_lib.camus_items(source, size=size, source="phantom")
    corpus_lib.build_corpus(items, root / "masks", size=size, source="phantom", source_info=info)
    return corpus_lib.open_corpus(root / "masks")


def measure(size: int, per_mask: int, patients: int = 6, workers: int | None = None) -> dict:
    """Images/s of synth.sample_and_write at `size` px with a sampler that costs ~nothing."""
    near_free = _near_free_sampler()
    with tempfile.TemporaryDirectory() as tmp:
        masks = _masks_corpus(Path(tmp), size, patients)
        def run(out, k):
            return synth.sample_and_write(
                near_free, lambda images: np.clip(np.round((np.asarray(images)[..., 0] + 1) * 127.5), 0,
                                                  255).astype(np.uint8),
                out, masks, splits=("train",), per_mask=k, seed=0, num_labels=labels_lib.NUM_SDM_LABELS,
                local_batch=BATCH, where="bench", workers=workers)
        with corpus_lib.CorpusWriter(Path(tmp) / "warm", size=size, source="synthetic") as warm:
            run(warm, 1)  # compiles the augmentation and label programs: the timed run is the steady state
        writer = corpus_lib.CorpusWriter(Path(tmp) / "out", size=size, source="synthetic")
        start, cpu = time.perf_counter(), time.process_time()
        stats = run(writer, per_mask)
        writer.close()
        manifest = corpus_lib.finalize_corpus(Path(tmp) / "out")
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert manifest["images"]["train"] == stats.sampled > 0
    return {"size": size, "images": stats.sampled, "seconds": stats.seconds, "wall_seconds": wall,
            "cpu_ms_per_image": 1e3 * cpu / stats.sampled,
            "images_per_s": stats.sampled / stats.seconds, "records": manifest["counts"]["train"],
            "bytes_per_triplet": manifest["bytes"] / manifest["counts"]["train"]}


def _near_free_sampler():
    return jax.jit(lambda labels, keys: (labels[..., None].astype(jnp.float32) / 2.5 - 1.0))


def measure_serial(size: int, per_mask: int, patients: int = 6) -> dict:
    """Images/s of the serial per-image host loop of the commits before the overlapped pipeline (their
    synth.generate's body), on only the APIs they had: runs on an older commit's code (see measure_at)."""
    near_free = _near_free_sampler()
    with tempfile.TemporaryDirectory() as tmp:
        masks = _masks_corpus(Path(tmp), size, patients)
        writer = corpus_lib.CorpusWriter(Path(tmp) / "out", size=size, source="synthetic")
        sources = [r for r in masks.iter("train") if synth.pipeline.sdm_filter(r)]
        total, split_id = len(sources) * per_mask, corpus_lib.SPLITS.index("train")
        near_free(np.zeros((BATCH, size, size), np.int32), np.zeros((BATCH, 2), np.uint32)).block_until_ready()
        synth.augmented_sample(sources[0], split_id, 0, 0), synth.sample_keys(0, split_id, np.arange(BATCH))  # warm
        start, cpu = time.perf_counter(), time.process_time()
        for first in range(0, total, BATCH):
            rows = list(range(first, min(first + BATCH, total)))
            augmented = [synth.augmented_sample(sources[s // per_mask], split_id, s, 0) for s in rows]
            labels_np = np.stack([synth.model_labels(m, c, labels_lib.NUM_SDM_LABELS, "bench") for m, c in augmented])
            keys_np = synth.sample_keys(0, split_id, np.asarray(rows))
            pad = BATCH - len(rows)
            images = near_free(np.concatenate([labels_np, np.repeat(labels_np[-1:], pad, 0)]).astype(np.int32),
                               np.concatenate([keys_np, np.repeat(keys_np[-1:], pad, 0)]))
            pixels = np.clip(np.round((np.asarray(images)[..., 0] + 1) * 127.5), 0, 255).astype(np.uint8)
            for s, (aug_mask, aug_cone), image in zip(rows, augmented, pixels):
                src = sources[s // per_mask]
                for record in corpus_lib.make_records(
                        image, aug_mask, name=f"{src['key'].split('/')[1]}_aug{s % per_mask}", patient=src["patient"],
                        view=src["view"], phase=src["phase"], sex=src["sex"], age=src["age"], quality=src["quality"],
                        split="train", source="synthetic", size=size, cone=aug_cone, drop_quality=True,
                        keep_orig_mask=False):
                    writer.add(record)
        writer.close()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        corpus_lib.finalize_corpus(Path(tmp) / "out")
    return {"size": size, "images": total, "seconds": seconds, "images_per_s": total / seconds,
            "cpu_ms_per_image": 1e3 * cpu / total}


def measure_at(commit: str, size: int, per_mask: int) -> dict:
    """measure_serial run on `commit`'s code (exported with git archive into a temporary folder)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", commit], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        code = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('synth_host', "
                f"{str(Path(__file__).resolve())!r}); m = importlib.util.module_from_spec(spec); "
                f"spec.loader.exec_module(m); print(json.dumps(m.measure_serial({size}, {per_mask})))")
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp, env={**os.environ, "PYTHONPATH": tmp},
                              capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", required=True, help="older commit to time beside this tree")
    parser.add_argument("--sizes", default="256,64")
    parser.add_argument("--repeats", type=int, default=2, help="old, now, old, now, ... (load drifts)")
    args = parser.parse_args(argv)
    for size in map(int, args.sizes.split(",")):
        per_mask = 16 if size >= 256 else 32
        for _ in range(args.repeats):
            old, now = measure_at(args.at, size, per_mask), measure(size, per_mask)
            print(f"synth_host {size}px: {args.at} {old['images_per_s']:.1f} images/s, now "
                  f"{now['images_per_s']:.1f} images/s ({now['images_per_s'] / old['images_per_s']:.1f}x; "
                  f"load {os.getloadavg()[0]:.1f}); CPU per image {old['cpu_ms_per_image']:.2f} -> "
                  f"{now['cpu_ms_per_image']:.2f} ms (all threads)", flush=True)


def run(quick: bool = False):
    rows, extra = [], {}
    for size, per_mask in ((64, 8), (256, 4)) if quick else ((64, 32), (256, 16)):
        result = measure(size, per_mask)
        extra[f"{size}px"] = result
        rows.append(Row(case=f"synth_host {size}px", impl="host pipeline", seconds=1 / result["images_per_s"],
                        items_per_s=result["images_per_s"],
                        note=f"{result['images']} images, near-free sampler, "
                             f"{result['bytes_per_triplet']:.0f} B/triplet"))
    return rows, extra


if __name__ == "__main__":
    main()

"""Host side of `jaxboost synth` with a near-free sampler: rows `synth_host <size>px` (images/s per host).

The sampler is replaced by a jitted function that turns the label maps into an image (no network), so the
figure is what the host pipeline (augmentation, label maps, shape words, prompts, encoding, writing) can
feed; a real run is bound by whichever of this and the device's sampling rate is lower, and prints how long
the device sat idle. Run: `python -m benchmarks.run --cases synth_host`.
"""
from __future__ import annotations

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
    near_free = jax.jit(lambda labels, keys: (labels[..., None].astype(jnp.float32) / 2.5 - 1.0))
    with tempfile.TemporaryDirectory() as tmp:
        masks = _masks_corpus(Path(tmp), size, patients)
        writer = corpus_lib.CorpusWriter(Path(tmp) / "out", size=size, source="synthetic")
        start = time.perf_counter()
        stats = synth.sample_and_write(
            near_free, lambda images: np.clip(np.round((np.asarray(images)[..., 0] + 1) * 127.5), 0, 255).astype(np.uint8),
            writer, masks, splits=("train",), per_mask=per_mask, seed=0, num_labels=labels_lib.NUM_SDM_LABELS,
            local_batch=BATCH, where="bench", workers=workers)
        writer.close()
        manifest = corpus_lib.finalize_corpus(Path(tmp) / "out")
        wall = time.perf_counter() - start
    assert manifest["images"]["train"] == stats.sampled > 0
    return {"size": size, "images": stats.sampled, "seconds": stats.seconds, "wall_seconds": wall,
            "images_per_s": stats.sampled / stats.seconds, "records": manifest["counts"]["train"],
            "bytes_per_triplet": manifest["bytes"] / manifest["counts"]["train"]}


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

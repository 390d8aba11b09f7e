"""`jaxboost synth`: a synthetic triplet corpus sampled from a trained SDM (SDM sampling, Wang et al. 2022).

  jaxboost synth --checkpoint RUN --masks CORPUS --out OUT --per-mask K --sampler ddim --steps 50 \
      --guidance 1.5 --seed S [--batch-size B] [--eta 0] [--splits train,val]

Every source image of a masks-corpus split (its multi-class mask and scan cone) is augmented K times
(affine + elastic, data/augment.py), turned into the model's label map, sampled with the run's EMA params and
written as 3 triplet records (LV, MYO, LA) with the source patient's metadata and prompts (source
"synthetic", prompts without image quality) into the same split name: synthetic train from real train masks,
synthetic val from real val masks; never test.

Determinism: sample s of split `split` (s = image index * K + k) draws its augmentation from
numpy default_rng([seed, split id, s]) and its diffusion noise from fold_in(fold_in(key(seed), split id), s).
Nothing depends on the batch, the device count or the host count, so the records are the same on 1 device,
8 devices or 2 hosts.

Hosts: host p of P samples s with s % P == p and writes them, in order, as writer p (its own shards); every
batch is one global array split over the mesh (each host fills its rows). Process 0 writes manifest.json
after a barrier (all writers closed).

Resume: a shard is complete once renamed from *.tmp (uploaded, off a local disk) and listed in its writer's
part manifest; a rerun with the same settings samples only the samples of shards not listed (no per-sample
file check), and ends with the same shards as an uninterrupted run. OUT and MASKS go through etils.epath (a
local folder or an object store such as gs://): each host writes its own shards and part manifest, process 0
alone merges them, and nothing needs a lock or a shared POSIX filesystem. The settings are stored in
OUT/config.json, so a folder holding another corpus (other checkpoint, seed, K, ...) is refused.

Host pipeline (`sample_and_write`): while the device runs call n, the host augments the masks of call n+1
and dispatches it (so the device always has the next call queued), then hands call n's images to a bounded
background stage (a thread pool, at most `STAGE_DEPTH` calls queued) that measures shape words, builds the
prompts and encodes the entries; one writer thread appends them in sample order. The run prints the
fraction of the sampling time the device sat idle waiting for the host.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import logging
import os
import time
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxboost import parallel
from jaxboost.data import augment as augment_lib
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import labels as labels_lib
from jaxboost.data import pipeline
from jaxboost.data import prompts as prompts_lib
from jaxboost.diffusion import samplers
from jaxboost.train import sdm as sdm_train

log = logging.getLogger(__name__)

SYNTH_SPLITS = ("train", "val")
DEFAULT_PER_DEVICE_BATCH = 4
LABELS = tuple(labels_lib.LABEL_OF[s] for s in labels_lib.STRUCTURES)
STAGE_DEPTH = 4  # sampler calls whose images may wait for the background stage (bounds host memory)


# ------------------------------------------------------------------------------------------ per sample

def model_labels(mask: np.ndarray, cone: np.ndarray, num_labels: int, where: str) -> np.ndarray:
    """CAMUS mask + cone [S, S] -> the label map the model was trained on (5: SDM labels with the cone;
    4: CAMUS labels)."""
    if mask.max(initial=0) >= labels_lib.NUM_CAMUS_LABELS:
        raise ValueError(f"{where}: mask label {int(mask.max())} is outside CAMUS labels 0-3")
    if num_labels == labels_lib.NUM_SDM_LABELS:
        return labels_lib.sdm_labels(mask, cone, is_cone=True)
    if num_labels == labels_lib.NUM_CAMUS_LABELS:
        return mask.astype(np.uint8)
    raise ValueError(f"{where}: the checkpoint's model has num_labels={num_labels}, but a masks corpus gives "
                     f"{labels_lib.NUM_CAMUS_LABELS} CAMUS labels ({labels_lib.NUM_SDM_LABELS} with the cone)")


@jax.jit
def _sdm_label_maps(maps):
    """uint8 [B, S, S, 2] (mask, cone) -> uint8 [B, S, S]: labels_lib.sdm_labels of each row (integer
    lookups: the same labels), and the largest mask label of each row."""
    mask, cone = maps[..., 0], maps[..., 1]
    table = jnp.asarray(np.concatenate([labels_lib.CAMUS_TO_SDM, np.zeros(252, np.uint8)]))
    return jnp.where(cone != 0, table[mask], 0).astype(jnp.uint8), mask.max(axis=(1, 2))


def batch_model_labels(maps: np.ndarray, num_labels: int, where) -> np.ndarray:
    """uint8 [B, S, S, 2] augmented (mask, cone) -> the model's label maps [B, S, S] (model_labels of every
    row, in one XLA call on the host's CPU: off the interpreter lock); where(i) names row i's source."""
    labels, peak = (np.asarray(a) for a in _sdm_label_maps(jax.device_put(maps, jax.local_devices(backend="cpu")[0])))
    bad = int(np.argmax(peak))
    if peak[bad] >= labels_lib.NUM_CAMUS_LABELS:
        raise ValueError(f"{where(bad)}: mask label {int(peak[bad])} is outside CAMUS labels 0-3")
    if num_labels == labels_lib.NUM_SDM_LABELS:
        return labels
    return model_labels(maps[..., 0], maps[..., 1], num_labels, where(0))


def augmented_samples(sources: list, split_id: int, indices, seed: int, rows: int | None = None) -> np.ndarray:
    """Samples `indices` (s = image index * K + k) of a split, sources[i] the source of indices[i] ->
    uint8 [len(indices), S, S, 2] (mask, cone), row i under one augmentation draw from
    default_rng([seed, split id, s]), all rows in one XLA call (`rows` >= len(indices) of them: see
    augmented_rows)."""
    return augmented_rows(source_maps(sources), np.arange(len(sources)), split_id, indices, seed, rows)


def source_maps(sources: list) -> np.ndarray:
    """uint8 [len(sources), S, S, 2]: each source's (mask, cone), stacked once per split (each is augmented
    K times; one gather per call then builds its batch)."""
    maps = np.empty((len(sources), *np.shape(sources[0]["mask"]), 2), np.uint8)
    for i, src in enumerate(sources):
        maps[i, ..., 0], maps[i, ..., 1] = src["mask"], src["cone"]
    return maps


def augmented_rows(maps: np.ndarray, of: np.ndarray, split_id: int, indices, seed: int,
                   rows: int | None = None) -> np.ndarray:
    """augmented_samples with the sources' maps stacked (source_maps): sample indices[i] augments
    maps[of[i]]. The call runs `rows` >= len(indices) rows, padded with copies of the last (one compiled
    shape per run); a row's result does not depend on the others."""
    indices, of = list(indices), np.asarray(of)
    pad = (rows or len(indices)) - len(indices)
    batch = maps[np.concatenate([of, np.repeat(of[-1:], pad)])]
    rngs = [np.random.default_rng([seed, split_id, s]) for s in indices + [indices[-1]] * pad]
    return augment_lib.augment_batch(batch, rngs)[:len(indices)]


def augmented_sample(source: dict, split_id: int, index: int, seed: int):
    """(mask, cone) of sample `index` of a split (augmented_samples of one)."""
    out = augmented_samples([source], split_id, [index], seed)[0]
    return out[..., 0], out[..., 1]


@jax.jit
def _fold_in_keys(seed, split_id, indices):
    base = jax.random.fold_in(jax.random.key(seed), split_id)
    return jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base, i))(indices))


KEY_CHUNK = 1024  # sample indices per compiled key call (one shape, whatever a split's length)


def sample_keys(seed: int, split_id: int, indices: np.ndarray) -> np.ndarray:
    """Raw key data [n, 2] of fold_in(fold_in(key(seed), split id), s) for each sample index s (compiled
    calls of KEY_CHUNK indices, not one dispatch per op)."""
    indices = np.asarray(indices, np.uint32).reshape(-1)
    if len(indices) <= 8:  # a few (tests, one sample): no padding to a chunk
        return np.asarray(_fold_in_keys(np.uint32(seed), np.uint32(split_id), indices))
    chunks = np.zeros(-(-len(indices) // KEY_CHUNK) * KEY_CHUNK, np.uint32)
    chunks[:len(indices)] = indices
    return np.concatenate([np.asarray(_fold_in_keys(np.uint32(seed), np.uint32(split_id), chunk))
                           for chunk in chunks.reshape(-1, KEY_CHUNK)])[:len(indices)]


# ------------------------------------------------------------------------------------------ planning

def _allgather(value: int) -> np.ndarray:
    """[process_count] values, one per host."""
    if jax.process_count() == 1:
        return np.asarray([value])
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).reshape(-1)


def _barrier(name: str) -> None:
    # jax.distributed's key-value barrier, not a device collective (sync_global_devices): on CPU, gloo's
    # first collective over the devices gives up when a peer is more than 30 s late (measured: later ones
    # wait), and the hosts reach the first barrier after loading the run and planning on their own.
    parallel.wait_for_processes(name)


# ------------------------------------------------------------------------------------------ host pipeline

@dataclasses.dataclass
class HostStats:
    sampled: int = 0            # images this host sampled
    seconds: float = 0.0        # wall time of the sampling loops (from the first dispatch)
    idle_seconds: float = 0.0   # upper bound on the time the device had no sampler call to run

    @property
    def idle_fraction(self) -> float:
        return self.idle_seconds / max(self.seconds, 1e-9)


class _IdleClock:
    """Upper bound on the device's idle time: from the last moment the newest call was known to be queued or
    running (its dispatch, or a later is_ready() == False) to the next dispatch, when it had finished by then."""

    def __init__(self, stats: HostStats):
        self._stats, self._output, self._busy_at = stats, None, None

    def seen(self) -> None:
        if self._output is not None and not _is_ready(self._output):
            self._busy_at = time.perf_counter()

    def dispatched(self, output, started: float) -> None:
        if self._output is not None and _is_ready(self._output):
            self._stats.idle_seconds += started - self._busy_at
        self._output, self._busy_at = output, time.perf_counter()


def _is_ready(output) -> bool:
    return getattr(output, "is_ready", lambda: True)()


class _BackgroundStage:
    """A thread pool for the per-image host work with at most `depth` calls queued, and one writer thread
    that hands the results to `write` in submission order (the corpus writer is used by that thread alone),
    so the sampling loop neither encodes nor writes. A failed job or write fails every write after it (a
    shard never gets entries out of order) and is raised to the caller at its next submit or drain."""

    def __init__(self, write, workers: int, depth: int = STAGE_DEPTH):
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="synth-host")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="synth-write")
        self._queue: collections.deque = collections.deque()  # write futures, oldest first
        self._write, self._depth, self._failed = write, depth, False

    def _write_result(self, job) -> None:
        if self._failed:
            raise RuntimeError("not written: an earlier call's host work or write failed")
        try:
            self._write(job.result())
        except BaseException:
            self._failed = True
            raise

    def submit(self, fn, *args) -> None:
        while self._queue and (len(self._queue) >= self._depth or self._queue[0].done()):
            self._queue.popleft().result()
        job = self._pool.submit(fn, *args)
        self._queue.append(self._writer.submit(self._write_result, job))

    def drain(self) -> None:
        while self._queue:
            self._queue.popleft().result()

    def close(self) -> None:
        self._failed = self._failed or bool(self._queue)  # closed with calls pending: write no more
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)


def _padded(rows: np.ndarray, count: int) -> np.ndarray:
    """rows padded to `count` with copies of the last (not copied when there are that many)."""
    return rows if len(rows) == count else np.concatenate([rows, np.repeat(rows[-1:], count - len(rows), 0)])


def _encoded_entries(metas: list, pixels: np.ndarray, per_mask: int) -> list:
    """(local position, entry, its bytes) for each sampled image of one call: the shape words of all its
    masks at once, then each image's prompts and encoding."""
    if not metas:
        return []
    shapes = prompts_lib.mask_shapes_batch(np.stack([m[3] for m in metas]), LABELS)
    done = []
    for (j, s, src, aug_mask, aug_cone), image, words in zip(metas, pixels, shapes):
        entry = corpus_lib.make_image(
            image, aug_mask, name=f"{src['key'].split('/')[1]}_aug{s % per_mask}", patient=src["patient"],
            view=src["view"], phase=src["phase"], sex=src["sex"], age=src["age"], quality=src["quality"],
            split=src["split"], source="synthetic", size=image.shape[0], cone=aug_cone, drop_quality=True,
            keep_orig_mask=False, shapes=words)
        done.append((j, entry, corpus_lib.encode_record(entry)))
    return done


def sample_and_write(sample, fetch, writer: corpus_lib.CorpusWriter, source_corpus: corpus_lib.Corpus, *,
                     splits, per_mask: int, seed: int, num_labels: int, local_batch: int, where: str,
                     progress: bool = False, workers: int | None = None) -> HostStats:
    """Samples every split's missing images and writes them; returns this host's timings.

    sample(labels uint8 [local_batch, S, S], keys uint32 [local_batch, 2]) -> images (dispatched, not waited
    for); fetch(images) -> uint8 [local_batch, S, S] on this host. Every host runs the same number of calls.
    """
    stats = HostStats()
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with _frozen_heap():
        for split in splits:
            stats = _sample_split(sample, fetch, writer, source_corpus, split, stats, per_mask=per_mask, seed=seed,
                                  num_labels=num_labels, local_batch=local_batch, where=where, progress=progress,
                                  workers=workers)
    return stats


@contextlib.contextmanager
def _frozen_heap():
    """The objects alive before the run (jax, the model, the masks: ~200k) moved out of the garbage
    collector's reach while it runs: the run's short-lived records otherwise trigger full collections that
    re-scan all of them (~0.1 ms per image at 256 px). Left alone when something else froze the heap."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _sample_split(sample, fetch, writer, source_corpus, split, stats, *, per_mask, seed, num_labels, local_batch,
                  where, progress, workers) -> HostStats:
    split_id, hosts, host = corpus_lib.SPLITS.index(split), jax.process_count(), jax.process_index()
    sources = [r for r in source_corpus.iter(split) if pipeline.sdm_filter(r)]
    table = source_maps(sources) if sources else None
    total = len(sources) * per_mask
    mine = list(range(host, total, hosts))  # this host's samples, in order
    todo = [j for j in range(len(mine)) if not writer.is_finished(split, j)]
    todo_per_host = _allgather(len(todo))
    calls = -(-int(todo_per_host.max()) // local_batch)
    size = source_corpus.size
    # The noise keys of all samples left, in one XLA call (not one per sampler call). A call with no rows
    # left on this host (it still runs, as every host does) pads with any key: its images are not written.
    keys = sample_keys(seed, split_id, np.asarray([mine[j] for j in todo] or [0]))
    written = 0  # local samples handed to the writer so far (added or skipped)

    def prepare(call: int):
        rows, metas = todo[call * local_batch:(call + 1) * local_batch], []
        srcs = [sources[mine[j] // per_mask] for j in rows]
        augmented = (augmented_rows(table, [mine[j] // per_mask for j in rows], split_id, [mine[j] for j in rows],
                                    seed, local_batch) if rows else [])
        # Each mask and cone contiguous (one copy per call): a strided view makes every later pass over it
        # (the entry's checks, shape words, encoding) ~2x slower.
        planes = np.ascontiguousarray(np.moveaxis(augmented, -1, 1)) if rows else []
        for j, src, (mask, cone) in zip(rows, srcs, planes):
            metas.append((j, mine[j], src, mask, cone))
        # A host with fewer samples left pads its rows (every host runs the same number of calls). The label
        # maps of all rows in one call (uint8: a quarter of the bytes to the device; the sampler casts them).
        labels_np = (batch_model_labels(augmented, num_labels, lambda i: f"{where}/{split}/{srcs[i]['key']}")
                     if rows else np.zeros((1, size, size), np.uint8))
        keys_np = keys[call * local_batch:call * local_batch + len(rows)] if rows else keys[:1]
        return _padded(labels_np, local_batch), _padded(keys_np, local_batch), metas

    def write(done: list) -> None:
        nonlocal written
        for j, entry, data in done:
            writer.skip(split, j - written)  # samples before j: their shard was finished by an earlier run
            writer.add_image(entry, data)
            written = j + 1

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=total - int(todo_per_host.sum()), desc=f"synth {split}", unit="img",
               disable=not progress, dynamic_ncols=True, mininterval=2.0)
    stage, ahead = _BackgroundStage(write, workers), concurrent.futures.ThreadPoolExecutor(1)
    clock, inflight, start = _IdleClock(stats), None, time.perf_counter()
    try:
        upcoming = ahead.submit(prepare, 0) if calls else None
        for call in range(calls):
            labels_np, keys_np, metas = upcoming.result()
            upcoming = ahead.submit(prepare, call + 1) if call + 1 < calls else None  # masks of the next call
            dispatch = time.perf_counter()
            output = sample(labels_np, keys_np)
            clock.dispatched(output, dispatch)
            start = start if call else time.perf_counter()  # the first call compiles: not sampling time
            if inflight is not None:
                stage.submit(_encoded_entries, inflight[1], fetch(inflight[0]), per_mask)
                clock.seen()
            inflight = (output, metas)
            stats.sampled += len(metas)
            bar.update(int(np.clip(todo_per_host - call * local_batch, 0, local_batch).sum()))
        if inflight is not None:
            stage.submit(_encoded_entries, inflight[1], fetch(inflight[0]), per_mask)
        stage.drain()
    finally:
        stage.close()
        ahead.shutdown(wait=True, cancel_futures=True)
        bar.close()
    writer.skip(split, len(mine) - written)
    stats.seconds += time.perf_counter() - start
    return stats


# ------------------------------------------------------------------------------------------ generate

def generate(checkpoint, masks, out, per_mask: int, sampler: str = "ddim", steps: int = 50,
             guidance: float | None = 1.5, seed: int = 0, batch_size: int | None = None, eta: float = 0.0,
             splits=SYNTH_SPLITS, records_per_shard: int = corpus_lib.DEFAULT_RECORDS_PER_SHARD,
             progress: bool = True, mesh=None) -> dict:
    """Samples the synthetic corpus into `out` (resumable); returns its manifest (on every process).

    checkpoint: an SDM training run folder (config.json + ckpt/); masks: a corpus folder; guidance None, 0 or
    1 samples the conditional model only (1 is the same result at half the cost).
    batch_size: global samples per sampler call (default 4 per device), a multiple of the mesh's batch shards.
    mesh: default the run config's mesh over all devices.
    """
    checkpoint, masks, out = epath.Path(checkpoint), epath.Path(masks), epath.Path(out)
    splits, guidance = _checked_arguments(splits, per_mask, steps, guidance, sampler, eta)
    source_corpus = corpus_lib.open_corpus(masks)
    config, params, ckpt_step, mesh = _open_sdm_run(checkpoint, masks, source_corpus, mesh, guidance)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = batch_size or DEFAULT_PER_DEVICE_BATCH * shards
    parallel.check_batch_divides(mesh, batch_size)
    hosts = jax.process_count()

    settings = {"checkpoint": _absolute(checkpoint), "checkpoint_step": int(ckpt_step),
                "masks": _absolute(masks), "per_mask": int(per_mask), "sampler": sampler, "steps": int(steps),
                "guidance": None if guidance is None else float(guidance), "eta": float(eta), "seed": int(seed),
                "splits": list(splits), "num_writers": hosts}
    writer = _open_writer(out, settings, config.model.image_size, records_per_shard)
    sample, fetch = _compiled_sampler(config, params, mesh, sampler, steps, eta, guidance)
    stats = sample_and_write(sample, fetch, writer, source_corpus, splits=splits, per_mask=per_mask, seed=seed,
                             num_labels=config.model.num_labels, local_batch=batch_size // hosts, where=str(masks),
                             progress=progress and parallel.is_main_process())
    manifest = _close_corpus(writer, out, settings)
    if progress and parallel.is_main_process():
        print(f"[jaxboost] synth: {manifest['counts']} records in {out} ({stats.sampled * hosts} images sampled in "
              f"{stats.seconds:.1f}s; device idle {stats.idle_fraction:.1%} of the sampling time, waiting "
              f"for the host)", flush=True)
    return manifest


def _absolute(path: epath.Path) -> str:
    """A local path made absolute (as config.json has always held it); a URI as it is."""
    return str(path.absolute()) if corpus_lib.is_local(path) else str(path)


def _checked_arguments(splits, per_mask: int, steps: int, guidance, sampler: str, eta: float):
    """-> (splits tuple, guidance or None for conditional-only); a bad value fails before any output."""
    splits = tuple(splits.split(",")) if isinstance(splits, str) else tuple(splits)
    for split in splits:
        if split not in SYNTH_SPLITS:
            raise ValueError(f"--splits: {split!r} is not one of {SYNTH_SPLITS} (no synthetic test split)")
    if per_mask < 1:
        raise ValueError(f"--per-mask must be >= 1, got {per_mask}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if guidance is not None and float(guidance) in (0.0, 1.0):
        guidance = None
    samplers.sampler_spec(sampler, eta)  # an unknown sampler or an eta it has none of fails before any output
    return splits, guidance


def _open_sdm_run(checkpoint: epath.Path, masks: epath.Path, source_corpus, mesh, guidance):
    """-> (config, params, checkpoint step, mesh) of the SDM run, checked against the masks corpus."""
    # The model first: a folder that is not an SDM run fails before anything is written.
    probe = checkpoint / "config.json"
    if not probe.is_file():
        raise FileNotFoundError(f"{probe}: not found; --checkpoint {checkpoint} is not a jaxboost SDM run folder")
    import ml_collections
    config = ml_collections.ConfigDict(json.loads(probe.read_text()))
    if config.get("trainer") == "sdm":  # labels checked before the (slow) restore
        model_labels(np.zeros((1, 1), np.uint8), np.ones((1, 1), np.uint8), int(config.model.num_labels),
                     f"{checkpoint}/config.json")
    mesh = mesh or parallel.mesh_from_config(config)
    config, params, ckpt_step = sdm_train.load_run(checkpoint, mesh)
    size = config.model.image_size
    if source_corpus.size != size:
        raise ValueError(f"{masks}: masks corpus is {source_corpus.size} px but the SDM in {checkpoint} "
                         f"generates {size} px images; build the masks corpus at --size {size}")
    if guidance is not None:
        sdm_train.warn_unguided_training(config, guidance)
    return config, params, ckpt_step, mesh


def _open_writer(out: epath.Path, settings: dict, size: int, records_per_shard: int) -> corpus_lib.CorpusWriter:
    """Process 0 claims the folder first (config.json), then every host opens its writer."""
    extra_config = {"source": "synthetic", "synth": settings}
    host = jax.process_index()
    if host == 0:
        corpus_lib.claim_folder(out, {"format": corpus_lib.FORMAT_NAME, "schema_version": corpus_lib.SCHEMA_VERSION,
                                      "size": size, "images_per_shard": corpus_lib.images_per_shard(records_per_shard),
                                      **extra_config})
    _barrier("synth_claim")
    return corpus_lib.CorpusWriter(out, size=size, source="synthetic", writer_id=host,
                                   records_per_shard=records_per_shard, extra_config=extra_config)


def _compiled_sampler(config, params, mesh, sampler: str, steps: int, eta: float, guidance):
    """-> (sample(labels_np, keys_np) -> images, dispatched not waited for; fetch(images) -> this host's
    rows as uint8 images)."""
    dtype = None if config.sampler.get("dtype", "float32") == "float32" else jnp.dtype(config.sampler.dtype)
    num_labels = config.model.num_labels
    run = samplers.make_sampler(
        sdm_train.apply_fn_for(sdm_train.build_model(config)), sdm_train.make_schedule(config),
        channels=config.model.in_channels, sampler=sampler, steps=steps, eta=eta, guidance=guidance, dtype=dtype)
    params = samplers.cast_params(params, dtype)  # once, not in every sampler call
    sample_fn = jax.jit(lambda p, labels, keys: run(p, sdm_train.one_hot_labels(labels.astype(jnp.int32),
                                                                          num_labels), keys))
    label_sharding = parallel.batch_sharding(mesh, 3)
    key_sharding = parallel.batch_sharding(mesh, 2)

    def sample(labels_np, keys_np):
        return sample_fn(params, jax.make_array_from_process_local_data(label_sharding, labels_np),
                         jax.make_array_from_process_local_data(key_sharding, keys_np))

    def fetch(images) -> np.ndarray:
        local = np.concatenate([np.asarray(s.data) for s in
                                sorted(images.addressable_shards, key=lambda s: s.index[0].start or 0)])
        return sdm_train.images_to_uint8(local)
    return sample, fetch


def _close_corpus(writer: corpus_lib.CorpusWriter, out: epath.Path, settings: dict) -> dict:
    """Every host closes its writer, then process 0 writes the manifest; -> the manifest (on every host)."""
    writer.close()
    _barrier("synth_writers_closed")
    if jax.process_index() == 0:
        corpus_lib.finalize_corpus(out, expect_writers=jax.process_count(),
                                   source_info={"kind": "synthetic", **settings})
    _barrier("synth_finalized")
    return json.loads((out / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------ CLI

def _guidance(value: str):
    return None if value.lower() in ("none", "off") else float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="SDM training run folder (config.json + ckpt/)")
    parser.add_argument("--masks", required=True, help="corpus whose masks condition the samples")
    parser.add_argument("--out", required=True, help="synthetic corpus folder (new, or an unfinished synth run)")
    parser.add_argument("--per-mask", type=int, required=True, help="augmented samples per source mask (K)")
    parser.add_argument("--sampler", default="ddim", choices=samplers.SAMPLERS.names())
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (respaced from the training schedule)")
    parser.add_argument("--guidance", type=_guidance, default=1.5,
                        help="classifier-free guidance scale (none/1: conditional only)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="global samples per call (default 4/device)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits of --masks to use")
    parser.add_argument("--records-per-shard", type=int, default=corpus_lib.DEFAULT_RECORDS_PER_SHARD)


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parallel.initialize_distributed()
    generate(args.checkpoint, args.masks, args.out, args.per_mask, sampler=args.sampler, steps=args.steps,
             guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, eta=args.eta, splits=args.splits,
             records_per_shard=args.records_per_shard)
    return 0

"""The input pipeline: grain over the triplet corpus, deterministic, split across hosts, checkpointable.

`make_loader` returns a grain DataLoader. Iterating it yields host-local batches (dict of numpy arrays,
strings as numpy str arrays) of global_batch_size // process_count examples; hosts read disjoint records.
The global batch of every step is the same examples in the same order (with the same per-record rngs)
whatever the number of hosts: host p's batch is slice p of the one global order (see _HostBatches).
`iter(loader)` gives a grain iterator whose `get_state()/set_state()` (or orbax via
`grain.PyGrainCheckpointHandler`) saves and restores the position exactly.
`prefetch_to_device` keeps a few batches in flight on the devices (placed as `jaxboost.parallel.shard_batch`
places them).

Host work is kept to reading: with `host_uint8=True` the transforms hand over the stored uint8 grayscale
(1/12 of the bytes of float32 x 3 channels) and `device_preprocess(batch, config, rng)`, called inside the
jitted step, casts, resizes, scales and flips on the device. Its output is what the host transforms give
without `host_uint8`, so a trainer switches by (1) passing `host_uint8=True` to its transform, (2) calling
`device_preprocess` first in its loss function, (3) giving `**loader_options(config)` to `make_loader`.
"""
from __future__ import annotations

import collections
import sys
from typing import Callable, Iterable, Iterator

import grain.python as grain
import numpy as np

from jaxboost.data import corpus as corpus_lib
from jaxboost.data import labels as labels_lib
from jaxboost.registry import Registry


def _to_numpy_tree(record: dict) -> dict:
    """Lists (prompts) -> numpy str arrays so grain's Batch stacks them as one array per field."""
    return {k: (np.asarray(v) if isinstance(v, (list, tuple, str)) else v) for k, v in record.items()}


def _drop_orig_mask(record: dict, rng=None) -> dict:
    """Raw records, batchable: orig_mask is dropped (its source-resolution shape differs between images;
    evaluate at original resolution with `Corpus.iter` or a transform that keeps it)."""
    return {k: v for k, v in record.items() if k != "orig_mask"}


class _HostBatches:
    """grain data source whose element j is this host's rows of global batch j, as (record, rng) pairs:
    positions j*B + p*b .. j*B + (p+1)*b of the global order (B global, b = B / P per host, host p). grain
    then handles one element per batch, not per record: its per-element cost (futures, statistics,
    wrappers) was as large as reading a record."""

    def __init__(self, source, order: "GlobalOrder", global_batch_size: int, process_index: int,
                 process_count: int, keep_remainder: bool):
        self._source, self._order = source, order
        self._batch, self._local = global_batch_size, global_batch_size // process_count
        self._offset = process_index * self._local
        self._end = len(order)
        full = self._end // global_batch_size if self._end != sys.maxsize else sys.maxsize
        self._len = full + int(full != sys.maxsize and keep_remainder and process_count == 1
                               and self._end % global_batch_size > 0)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:  # grain checks the source's repr when it restores an iterator
        return f"_HostBatches({self._source!r}, {self._order!r}, batch={self._batch}, offset={self._offset})"

    def __getitem__(self, index: int) -> list:
        start = int(index) * self._batch + self._offset
        metas = [self._order[k] for k in range(start, min(start + self._local, self._end))]
        return [(self._source[m.record_key], m.rng) for m in metas]


class _BatchIndices:
    """grain sampler over batch numbers 0 .. n-1 (the order lives in GlobalOrder)."""

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"_BatchIndices({self._n})"

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._n:
            raise IndexError(f"batch {index} out of range [0, {self._n})")
        return grain.RecordMetadata(index=index, record_key=index, rng=None)


class _TransformAndStack(grain.MapTransform):
    """[(record, rng)] -> one host batch: transform(record, rng) for each, then every field stacked (strings
    as numpy str arrays)."""

    def __init__(self, transform: Callable[[dict, np.random.Generator], dict]):
        self._transform = transform

    def map(self, element: list) -> dict:
        examples = [_to_numpy_tree(self._transform(record, rng)) for record, rng in element]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class GlobalOrder:
    """The one global sample order: epoch e visits the records in a permutation drawn from (seed, e) (numpy,
    kept for the current epochs), or in order without shuffle; num_epochs None repeats forever. Position i
    carries grain's per-record rng, Philox(key=seed + i). Same interface as grain.IndexSampler; grain's own
    index_shuffle costs ~0.3 ms per record on corpora of a few hundred records (as much as reading one)."""

    def __init__(self, num_records: int, *, seed: int, shuffle: bool = True, num_epochs: int | None = None):
        if num_records <= 0:
            raise ValueError(f"GlobalOrder: num_records must be > 0, got {num_records}")
        self._n, self._seed, self._shuffle, self._epochs = int(num_records), int(seed), bool(shuffle), num_epochs
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def __len__(self) -> int:
        return sys.maxsize if self._epochs is None else self._epochs * self._n

    def __repr__(self) -> str:
        return f"GlobalOrder({self._n} records, seed={self._seed}, shuffle={self._shuffle}, epochs={self._epochs})"

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng((self._seed, epoch)).permutation(self._n)
            while len(self._perms) > 2:  # positions move forward: the current and the next epoch
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(f"sample position {index} out of range [0, {len(self)})")
        epoch, within = divmod(int(index), self._n)
        key = int(self._permutation(epoch)[within]) if self._shuffle else within
        return grain.RecordMetadata(index=index, record_key=key,
                                    rng=np.random.Generator(np.random.Philox(key=self._seed + index)))


def grain_worker_args(worker_count: int, prefetch: int, read_buffer: int = 16) -> dict:
    """grain.DataLoader's worker and read settings. Reads run on READ_THREADS threads with a short buffer
    (`read_buffer` elements): grain's default (16 threads, 500 elements) spends more time polling its
    futures than reading on a small host, and `prefetch` batches per worker are read ahead either way."""
    if worker_count > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app, use defaults
            flags.FLAGS.mark_as_parsed()
    return {"worker_count": worker_count, "worker_buffer_size": prefetch,
            "read_options": grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=read_buffer)}


READ_THREADS = 2
BATCHES_READ_AHEAD = 2  # make_loader's elements are whole batches


class _HostSliceSampler:
    """Host `process_index`'s share of one global sample order, so global batches do not depend on the host
    count. The DataLoader (given ShardOptions(p, P)) asks for stream indices k = j * P + p for its local
    position j; local position j is global position (j // b) * B + p * b + j % b (b = B / P): host p gets
    rows [p*b, (p+1)*b) of every global batch. Record keys and per-record rngs come from the global position,
    so transforms draw the same numbers on any number of hosts. The stream stops after the last full
    global batch (when there are several hosts) so all hosts run the same number of steps."""

    def __init__(self, global_sampler: grain.IndexSampler, global_batch_size: int, process_count: int,
                 keep_remainder: bool):
        self._global = global_sampler
        self._batch = global_batch_size
        self._hosts = process_count
        self._local = global_batch_size // process_count
        total = len(global_sampler)
        if total != sys.maxsize and not (keep_remainder and process_count == 1):
            total = (total // global_batch_size) * global_batch_size
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"_HostSliceSampler({self._global!r}, global_batch_size={self._batch}, hosts={self._hosts})"

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._len:
            raise IndexError(f"sampler index {index} out of range [0, {self._len})")
        host, position = index % self._hosts, index // self._hosts
        global_position = (position // self._local) * self._batch + host * self._local + position % self._local
        meta = self._global[global_position]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)


class _Subset:
    """The records of a data source that pass a filter (indices decided once, from metadata when it can)."""

    def __init__(self, source, indices: list[int]):
        self._source, self._indices = source, list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict:
        return self._source[self._indices[int(index)]]

    def __repr__(self) -> str:
        return f"_Subset({self._source!r}, {len(self)} records)"


def _kept_indices(source, keep: Callable[[dict], bool]) -> list[int]:
    """Indices of records passing `keep`, judged on metadata only (no array decoding) unless the filter
    needs an array field. A filter on one structure (`keep.structure`, as sdm_filter) is answered from the
    corpus manifest without reading a record (every host would otherwise scan the whole split at start)."""
    structure = getattr(keep, "structure", None)
    if structure is not None and hasattr(source, "indices_of_structure"):
        indices = source.indices_of_structure(structure)
        if indices is not None:
            return indices
    try:
        return [i for i, r in enumerate(source.iter_sequential(arrays=False)) if keep(r)]
    except KeyError:
        return [i for i, r in enumerate(source.iter_sequential(arrays=True)) if keep(r)]


def make_loader(corpus_dir, split: str, *, global_batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, transform: Callable | None = None,
                drop_remainder: bool = True, process_index: int | None = None,
                process_count: int | None = None, worker_count: int = 0, prefetch: int = 2,
                filter_fn: Callable[[dict], bool] | None = None) -> grain.DataLoader:
    """grain DataLoader over one split of a corpus.

    global_batch_size: examples per step over all hosts; each host gets global_batch_size // process_count.
    transform(record, np_rng) -> dict: per-record map with an rng fixed by (seed, record index).
    filter_fn(record) -> bool: drop records before sampling (e.g. keep one structure per image), judged once
        on each record's metadata (the full record if it needs arrays); defaults to the transform's own
        `record_filter` attribute (sdm_transform sets one). Filtering before sampling keeps the global
        batches independent of the host count.
    process_index/process_count default to jax.process_index()/jax.process_count().
    worker_count: grain worker processes, each making whole batches in turn (the same batches in the same
        order whatever the worker count).
    prefetch: batches each worker keeps ready (grain's worker_buffer_size). `loader_options(config)` gives
        both from config.data.workers / config.data.prefetch.
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    corpus = corpus_lib.open_corpus(corpus_dir)
    source = corpus.source(split)
    if len(source) == 0:
        raise ValueError(f"{corpus_dir}: split {split!r} is empty")
    if filter_fn is None:
        filter_fn = getattr(transform, "record_filter", None)
    if filter_fn is not None:
        source = _Subset(source, _kept_indices(source, filter_fn))
        if len(source) == 0:
            raise ValueError(f"{corpus_dir}: no record of split {split!r} passes the filter")
    # One global order over all hosts; each host reads only its rows of every global batch.
    order = GlobalOrder(len(source), seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    batches = _HostBatches(source, order, global_batch_size, process_index, process_count,
                           keep_remainder=not drop_remainder)
    return grain.DataLoader(data_source=batches, sampler=_BatchIndices(len(batches)),
                            operations=[_TransformAndStack(transform or _drop_orig_mask)],
                            shard_options=grain.NoSharding(),
                            **grain_worker_args(worker_count, prefetch, read_buffer=BATCHES_READ_AHEAD))


def loader_options(config) -> dict:
    """make_loader's worker settings from config.data: `workers` (grain worker processes; 0 = read in the
    training process) and `prefetch` (batches each worker keeps ready)."""
    data = config.get("data", None) or {}
    workers, prefetch = int(data.get("workers", 0)), int(data.get("prefetch", 2))
    if workers < 0 or prefetch < 1:
        raise ValueError(f"config.data.workers={workers} must be >= 0 and config.data.prefetch={prefetch} >= 1")
    return {"worker_count": workers, "prefetch": prefetch}


def host_uint8(config) -> bool:
    """`config.data.host_uint8` (default True): the trainers hand the stored uint8 grayscale to the step and
    `device_preprocess` makes the model's input there; False keeps the float32 host transforms (the same
    values, for comparison)."""
    return bool((config.get("data", None) or {}).get("host_uint8", True))


def prefetch_to_device(batches: Iterable[dict], sharding_for: Callable[[int], object], size: int = 2) -> Iterator[dict]:
    """Host batches -> global jax.Arrays, `size` batches ahead: the transfers are asynchronous, so the next
    batches travel while the current step runs. sharding_for(ndim) -> the sharding of an ndim array (e.g.
    `lambda n: parallel.batch_sharding(mesh, n)`); strings stay on the host."""
    import jax
    queue = collections.deque()

    def put(batch):
        return {k: (jax.make_array_from_process_local_data(sharding_for(np.ndim(v)), v)
                    if np.asarray(v).dtype.kind in "biuf" else v) for k, v in batch.items()}

    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


# ---------------------------------------------------------------------------------------------- transforms
def segmentation_transform(prompt_index: int, size: int | None = None, *, ending: int | None = None,
                           hflip: bool = False, host_uint8: bool = False) -> Callable[[dict, np.random.Generator], dict]:
    """Record -> CLIPSeg/CRIS example.

    Output: image float32 [S, S, 3] in [0, 1] (grayscale replicated; model normalisation comes later),
    mask float32 [S, S] binary mask of the record's structure, prompt str (P_{prompt_index}, ending chosen
    with the rng unless `ending` fixes it), label int32, key str. size resizes when it differs from the corpus.
    host_uint8: image uint8 [S0, S0] and the CAMUS mask uint8 [S0, S0] (0-3) as stored, no flip:
    `device_preprocess` takes the structure's mask, resizes, casts and flips them in the step.
    """
    if not 0 <= prompt_index < 8:
        raise ValueError(f"prompt_index must be in 0..7, got {prompt_index}")

    def text(record: dict, rng: np.random.Generator) -> dict:
        which = int(rng.integers(2)) if ending is None else int(ending)
        return {"prompt": record["prompts"][prompt_index][which], "label": np.int32(record["label"]),
                "key": record["key"]}

    def transform(record: dict, rng: np.random.Generator) -> dict:
        image, mask = record["image"], record["mask"]
        if host_uint8:  # no array work on the host: the structure's mask is taken on device
            return {"image": image, "mask": mask, **text(record, rng)}
        if size is not None and image.shape[0] != size:
            image, mask = corpus_lib.resize(image, size, False), corpus_lib.resize(mask, size, True)
        binary = labels_lib.binary_mask(mask, record["label"]).astype(np.float32)
        image = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
        if hflip and rng.random() < 0.5:
            image, binary = image[:, ::-1], binary[:, ::-1]
        return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(binary), **text(record, rng)}
    return transform


def sdm_transform(size: int | None = None, *, sdm_labels: bool = True, channels: int = 1,
                  host_uint8: bool = False) -> Callable[[dict, np.random.Generator], dict]:
    """Record -> SDM example: image float32 [S, S, channels] in [-1, 1], labels int32 [S, S]
    (5 SDM labels with the cone when sdm_labels, else CAMUS 0-3), key str. The returned function carries
    `record_filter = sdm_filter`, which make_loader applies so each image is used once, not three times.
    host_uint8: image, mask and cone uint8 [S0, S0] as stored (`device_preprocess` makes the SDM labels;
    the host_uint8 path always makes the 5 SDM labels)."""

    if host_uint8 and not sdm_labels:
        raise ValueError("sdm_transform: host_uint8 makes the 5 SDM labels on device (sdm_labels=True)")

    def transform(record: dict, rng: np.random.Generator) -> dict:
        del rng
        image, mask, cone = record["image"], record["mask"], record["cone"]
        if host_uint8:  # the 5-label map is made on device
            return {"image": image, "mask": mask, "cone": cone, "key": record["key"]}
        if size is not None and image.shape[0] != size:
            image = corpus_lib.resize(image, size, False)
            mask, cone = corpus_lib.resize(mask, size, True), corpus_lib.resize(cone, size, True)
        labels = labels_lib.sdm_labels(mask, cone, is_cone=True) if sdm_labels else mask
        image = image.astype(np.float32) / 127.5 - 1.0
        return {"image": np.repeat(image[..., None], channels, axis=-1), "labels": labels.astype(np.int32),
                "key": record["key"]}
    transform.record_filter = sdm_filter
    return transform


def sdm_filter(record: dict) -> bool:
    """One record per image (the LV one): a corpus has one record per structure of each image."""
    return record["structure"] == "LV"


sdm_filter.structure = "LV"  # lets _kept_indices take the record indices from the manifest


# ---------------------------------------------------------------------------------------------- on device
# By trainer name: batch (host_uint8 fields, global arrays) -> what that trainer's host transform gives.
# Pure jax, meant to run inside the jitted step (the cast and resize fuse into the first layer's input).
DEVICE_PREPROCESS = Registry("device preprocessing")


def device_preprocess(batch: dict, config, rng=None) -> dict:
    """uint8 host batch -> the model-ready batch of `config.trainer`, on device; float batches (the host
    transforms without host_uint8) pass through unchanged. rng: the step's key, for flips (data.hflip)."""
    return DEVICE_PREPROCESS.get(config.trainer)(batch, config, rng)


def _resize_square(x, size: int, method: str):
    """[B, H, W] -> [B, size, size]: bilinear (half-pixel centres, as PIL's upsampling) or nearest."""
    import jax
    if x.shape[1:3] == (size, size):
        return x
    return jax.image.resize(x, (x.shape[0], size, size), method, antialias=method != "nearest")


def _random_hflip(rng, *arrays):
    """Each example of the [B, H, W, ...] arrays flipped left-right with probability 1/2 (one draw per example)."""
    import jax
    import jax.numpy as jnp
    flip = jax.random.bernoulli(rng, 0.5, (arrays[0].shape[0],))
    where = lambda a: jnp.where(flip.reshape((-1,) + (1,) * (a.ndim - 1)), a[:, :, ::-1], a)
    return tuple(where(a) for a in arrays)


@DEVICE_PREPROCESS.register("vl_seg")
def _segmentation_on_device(batch: dict, config, rng=None) -> dict:
    """image uint8 [B, S0, S0] -> float32 [B, S, S, 3] in [0, 1]; the CAMUS mask uint8 [B, S0, S0] and the
    record's label [B] -> float32 binary mask of that structure [B, S, S] (labels.binary_mask). With the
    step's rng: flips (data.hflip) and the anatomy-preserving augmentation of data.augment (seg_augment)."""
    import jax
    import jax.numpy as jnp

    from jaxboost.data import seg_augment
    if batch["image"].dtype != jnp.uint8:
        return batch
    size = int(config.data.size)
    image = _resize_square(batch["image"].astype(jnp.float32) / 255.0, size, "bilinear")
    structure = (batch["mask"] == batch["label"].astype(jnp.uint8)[:, None, None]).astype(jnp.uint8)
    mask = _resize_square(structure, size, "nearest").astype(jnp.float32)
    if config.data.get("hflip", False) and rng is not None:
        image, mask = _random_hflip(rng, image, mask)
    magnitudes = seg_augment.magnitudes(config.data.get("augment", None))  # checked even when unused
    if seg_augment.enabled(magnitudes) and rng is not None:
        image, mask = seg_augment.augment_batch(jax.random.fold_in(rng, 1), image, mask, magnitudes)
    return dict(batch, image=jnp.repeat(image[..., None], 3, axis=-1), mask=mask)


@DEVICE_PREPROCESS.register("sdm")
def _sdm_on_device(batch: dict, config, rng=None) -> dict:
    """image uint8 [B, S0, S0] -> float32 [B, S, S, channels] in [-1, 1]; CAMUS mask + cone uint8 -> the
    5 SDM labels int32 [B, S, S] (labels.sdm_labels: structures clipped to the cone)."""
    import jax.numpy as jnp
    if batch["image"].dtype != jnp.uint8:
        return batch
    size, channels = int(config.data.size), int(config.model.in_channels)
    image = _resize_square(batch["image"].astype(jnp.float32), size, "bilinear") / 127.5 - 1.0
    camus_to_sdm = jnp.asarray(labels_lib.CAMUS_TO_SDM)
    labels = jnp.where(batch["cone"] > 0, camus_to_sdm[batch["mask"].astype(jnp.int32)], 0).astype(jnp.uint8)
    labels = _resize_square(labels, size, "nearest").astype(jnp.int32)
    rest = {k: v for k, v in batch.items() if k not in ("mask", "cone")}
    return dict(rest, image=jnp.repeat(image[..., None], channels, axis=-1), labels=labels)


@DEVICE_PREPROCESS.register("unet_seg")
def _unet_on_device(batch: dict, config, rng=None) -> dict:
    """image uint8 [B, S, S] -> float32 [B, S, S, 1] in [0, 1]; CAMUS labels uint8 -> int32."""
    import jax.numpy as jnp
    if batch["image"].dtype != jnp.uint8:
        return batch
    return dict(batch, image=batch["image"].astype(jnp.float32)[..., None] / 255.0,
                labels=batch["labels"].astype(jnp.int32))


def crop_resize_flip(images, crop_box, flip, size: int):
    """images [B, H, W, C] (uint8 or float, 0..255), crop_box [B, 4] float (top, left, h, w) in pixels, flip [B]
    -> uint8-valued float32 [B, size, size, C]: PIL's `resize((size, size), BICUBIC, box=...)` of each box
    (Keys cubic a=-0.5, its support widened when shrinking, weights renormalised at the borders; as PIL, the
    horizontal pass first, each pass rounded and clipped to 0..255), mirrored where flip
    (caption_augment.device_view_inputs)."""
    import jax
    import jax.numpy as jnp

    def one_pass(image, start, length, axis):
        scale = size / length  # output centre y + 1/2 samples the input at start + (y + 1/2) / scale (PIL)
        shape = list(image.shape)
        shape[axis] = size
        out = jax.image.scale_and_translate(image, shape, (axis,), scale[None], (-start * scale)[None], "cubic",
                                            antialias=True)
        return jnp.clip(jnp.round(out), 0, 255)

    def one(image, box):
        return one_pass(one_pass(image, box[1], box[3], 1), box[0], box[2], 0)
    out = jax.vmap(one)(images.astype(jnp.float32), crop_box.astype(jnp.float32))
    return jnp.where(flip.reshape(-1, 1, 1, 1) > 0, out[:, :, ::-1], out)


@DEVICE_PREPROCESS.register("mumc_pretrain")
def _mumc_on_device(batch: dict, config, rng=None) -> dict:
    """images uint8 [B, S, S, 3] -> float32 normalised with CLIP's mean/std, as caption_augment.normalize.
    With data.augment_at="host" they are the host's augmented views (crop, flip and RandAugment: PIL ops);
    with "device" the batch carries each view's crop_box and flip, applied here first."""
    import jax.numpy as jnp
    from jaxboost.data import caption_augment
    if batch["images"].dtype != jnp.uint8:
        return batch
    images = batch["images"]
    if "crop_box" in batch:
        images = crop_resize_flip(images, batch["crop_box"], batch["flip"], int(config.data.size))
    images = (images.astype(jnp.float32) / 255.0 - caption_augment.MEAN) / caption_augment.STD
    return dict({k: v for k, v in batch.items() if k not in ("crop_box", "flip")}, images=images)


DEVICE_PREPROCESS.register("mumc_vqa")(_mumc_on_device)

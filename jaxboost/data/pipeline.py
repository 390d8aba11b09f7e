"""The input pipeline: grain over the triplet corpus, deterministic, split across hosts, checkpointable.

`make_loader` returns a grain DataLoader. Iterating it yields host-local batches (dict of numpy arrays,
strings as numpy str arrays) of global_batch_size // process_count examples; hosts read disjoint records.
The global batch of every step is the same examples in the same order (with the same per-record rngs)
whatever the number of hosts: host p's batch is slice p of the one global order (see _HostSliceSampler).
`iter(loader)` gives a grain iterator whose `get_state()/set_state()` (or orbax via
`grain.PyGrainCheckpointHandler`) saves and restores the position exactly.
`host_batch_to_global` turns host batches into global jax.Arrays on a mesh.
"""
from __future__ import annotations

import sys
from typing import Callable

import grain.python as grain
import numpy as np

from jaxboost.data import corpus as corpus_lib
from jaxboost.data import labels as labels_lib


def _to_numpy_tree(record: dict) -> dict:
    """Lists (prompts) -> numpy str arrays so grain's Batch stacks them as one array per field."""
    return {k: (np.asarray(v) if isinstance(v, (list, tuple, str)) else v) for k, v in record.items()}


class _RandomRecordTransform(grain.RandomMapTransform):
    """Calls transform(record, rng) with grain's per-record rng (derived from the seed and record index)."""

    def __init__(self, transform: Callable[[dict, np.random.Generator], dict]):
        self._transform = transform

    def random_map(self, element, rng: np.random.Generator):
        return _to_numpy_tree(self._transform(element, rng))


class _ToNumpy(grain.MapTransform):
    """Raw records, batchable: orig_mask is dropped (its source-resolution shape differs between images;
    evaluate at original resolution with `Corpus.iter` or a transform that keeps it)."""

    def map(self, element):
        return _to_numpy_tree({k: v for k, v in element.items() if k != "orig_mask"})


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
                process_count: int | None = None, worker_count: int = 0,
                filter_fn: Callable[[dict], bool] | None = None) -> grain.DataLoader:
    """grain DataLoader over one split of a corpus.

    global_batch_size: examples per step over all hosts; each host gets global_batch_size // process_count.
    transform(record, np_rng) -> dict: per-record map with an rng fixed by (seed, record index).
    filter_fn(record) -> bool: drop records before sampling (e.g. keep one structure per image), judged once
        on each record's metadata (the full record if it needs arrays); defaults to the transform's own
        `record_filter` attribute (sdm_transform sets one). Filtering before sampling keeps the global
        batches independent of the host count.
    process_index/process_count default to jax.process_index()/jax.process_count().
    worker_count: grain worker processes. With workers each one batches its own records in turn, so the
        order is reproducible for a given (seed, worker_count), not across worker counts.
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
    global_sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.NoSharding(),
                                        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    sampler = _HostSliceSampler(global_sampler, global_batch_size, process_count, keep_remainder=not drop_remainder)
    shard_options = grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
    operations = []
    operations.append(_RandomRecordTransform(transform) if transform is not None else _ToNumpy())
    operations.append(grain.Batch(batch_size=global_batch_size // process_count, drop_remainder=drop_remainder))
    if worker_count > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app, use defaults
            flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count, shard_options=shard_options)


def host_batch_to_global(batch: dict, sharding) -> dict:
    """Host-local numeric arrays -> global jax.Arrays sharded on `sharding` (strings are left on the host)."""
    import jax
    return {k: (jax.make_array_from_process_local_data(sharding, v) if np.asarray(v).dtype.kind in "biuf" else v)
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- transforms
def segmentation_transform(prompt_index: int, size: int | None = None, *, ending: int | None = None,
                           hflip: bool = False) -> Callable[[dict, np.random.Generator], dict]:
    """Record -> CLIPSeg/CRIS example.

    Output: image float32 [S, S, 3] in [0, 1] (grayscale replicated; model normalisation comes later),
    mask float32 [S, S] binary mask of the record's structure, prompt str (P_{prompt_index}, ending chosen
    with the rng unless `ending` fixes it), label int32, key str. size resizes when it differs from the corpus.
    """
    if not 0 <= prompt_index < 8:
        raise ValueError(f"prompt_index must be in 0..7, got {prompt_index}")

    def transform(record: dict, rng: np.random.Generator) -> dict:
        image, mask = record["image"], record["mask"]
        if size is not None and image.shape[0] != size:
            image, mask = corpus_lib.resize(image, size, False), corpus_lib.resize(mask, size, True)
        binary = labels_lib.binary_mask(mask, record["label"]).astype(np.float32)
        image = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
        if hflip and rng.random() < 0.5:
            image, binary = image[:, ::-1], binary[:, ::-1]
        which = int(rng.integers(2)) if ending is None else int(ending)
        return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(binary),
                "prompt": record["prompts"][prompt_index][which], "label": np.int32(record["label"]),
                "key": record["key"]}
    return transform


def sdm_transform(size: int | None = None, *, sdm_labels: bool = True,
                  channels: int = 1) -> Callable[[dict, np.random.Generator], dict]:
    """Record -> SDM example: image float32 [S, S, channels] in [-1, 1], labels int32 [S, S]
    (5 SDM labels with the cone when sdm_labels, else CAMUS 0-3), key str. The returned function carries
    `record_filter = sdm_filter`, which make_loader applies so each image is used once, not three times."""

    def transform(record: dict, rng: np.random.Generator) -> dict:
        del rng
        image, mask, cone = record["image"], record["mask"], record["cone"]
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

"""The triplet corpus: sharded ArrayRecord files of images (image, mask, cone, prompts, metadata) + a manifest.

Layout of a corpus folder:
    config.json                  what this folder is being built as (schema, size, shard size, source);
                                 a second build with another config is refused.
    {split}-w{writer:03d}-{index:05d}.array_record   complete shards only (written as *.tmp, then renamed)
    parts/writer-{writer:03d}.json                    the shards one writer finished (its part manifest),
                                                      rewritten as each shard is finished and hashed
    manifest.json                written last, atomically, by `finalize_corpus` from all parts

Storage (schema 2): one ArrayRecord entry per image holds the image, its multi-class mask, cone and the
prompts of every structure present in the mask; a triplet (image, mask, prompt) record is the pair
(entry, structure), so the pixels are stored once, not once per structure. The manifest lists, per shard,
its images, its records and the (row, structure) pairs absent because that structure's mask is empty; a
record index resolves to (shard, row, structure) from the manifest alone, with no read. Schema 1 corpora
(one entry per record, the image repeated in each) are still read.

Shard i of (split, writer) holds that writer's images i*N .. i*N+N-1 of the split, in the order they were
given, so a killed build that is rerun with the same input skips the shards its part manifest lists,
redoes only the unfinished one, and ends with byte-identical shards and manifest. Several hosts write one
corpus with distinct writer ids; `finalize_corpus` merges their parts.

Paths: every corpus path goes through etils.epath, so a corpus may live on a local disk or an object store
(gs://, s3://: nothing assumes a shared POSIX filesystem; no locks, no renames across hosts). ArrayRecord
reads and writes local files only, so off a local disk a shard is written to a local staging file and
uploaded once finished (an object appears whole or not at all), and a reader fetches a shard into a local
cache the first time it opens it.

Record contract (decoded dict): key, image uint8 [S, S], mask uint8 [S, S] (CAMUS labels 0-3), cone uint8
[S, S], structure "LV"|"MYO"|"LA", label 1|2|3, prompts (8 x [ending "of the heart", ending "in the cardiac
ultrasound"]), patient, view, phase, sex, age, quality, split, source ("camus"|"phantom"|"synthetic"),
orig_mask uint8 [H0, W0] (source resolution; may be empty for synthetic).
Encoding: msgpack map; arrays as {dtype, shape, zlib bytes}.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack
import numpy as np
from etils import epath
from PIL import Image

from jaxboost import jsonio
from jaxboost.data import json_list
from jaxboost.data import labels as labels_lib
from jaxboost.data import prompts as prompts_lib

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
FORMAT_NAME = "jaxboost-triplet-corpus"
SPLITS = ("train", "val", "test")
SOURCES = ("camus", "phantom", "synthetic")
ARRAY_FIELDS = ("image", "mask", "cone", "orig_mask")
RECORDS_PER_IMAGE = len(labels_lib.STRUCTURES)
DEFAULT_RECORDS_PER_SHARD = 1024
MIN_SIZE, SIZE_MULTIPLE = 16, 8  # the U-Nets halve the image 3+ times; CLIP-style encoders patch it
MAX_OPEN_READERS = 16  # per CorpusSource: a host holds a bounded number of shard files open
_SHARD_RE = re.compile(r"^(train|val|test)-w(\d{3})-(\d{5})\.array_record$")
# One entry per chunk (cheap random access for grain); zstd:1 shrinks the prompt text ~4x at a tenth of the
# CPU of ArrayRecord's default brotli (the arrays inside are zlib-compressed already).
_ARRAY_RECORD_OPTIONS = "group_size:1,zstd:1"


def check_size(size: int, where: str = "--size") -> int:
    """A corpus image size the models can take: a multiple of 8, at least 16."""
    if int(size) != size or size < MIN_SIZE or size % SIZE_MULTIPLE:
        raise ValueError(f"{where} {size}: the corpus size must be a multiple of {SIZE_MULTIPLE} and at least "
                         f"{MIN_SIZE} (e.g. 64, 256, 352)")
    return int(size)


def images_per_shard(records_per_shard: int) -> int:
    """Shards are cut by image (so a resume knows a shard's images before loading them): about
    `records_per_shard` records each, i.e. that many / 3 images, rounded up."""
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    return -(-int(records_per_shard) // RECORDS_PER_IMAGE)


# ----------------------------------------------------------------------------------------------- records
def encode_record(record: dict) -> bytes:
    """Record dict -> bytes (msgpack; numpy arrays as raw bytes with dtype and shape; fields sorted, so the
    bytes do not depend on how the dict was put together). The shard's zstd chunks compress the arrays
    (as well as zlib did and ~5x faster); schema-1 entries hold zlib-compressed arrays and still decode."""
    out = {}
    for name, value in sorted(record.items()):
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)
            out[name] = {"__nd__": True, "dtype": value.dtype.str, "shape": list(value.shape), "codec": "raw",
                         "data": value.tobytes()}
        elif isinstance(value, np.integer):
            out[name] = int(value)
        else:
            out[name] = value
    return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes, arrays: bool = True) -> dict:
    """bytes -> record dict with numpy arrays (inverse of encode_record); arrays=False leaves them out
    (metadata only, much faster for counting)."""
    record = msgpack.unpackb(data, raw=False)
    for name, value in list(record.items()):
        if isinstance(value, dict) and value.get("__nd__"):
            if not arrays:
                del record[name]
                continue
            raw = value["data"] if value.get("codec") == "raw" else zlib.decompress(value["data"])
            record[name] = np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    return record


def resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """[H, W] uint8 -> [size, size] uint8 (PIL; bilinear for images, nearest for label maps). Stretches, as
    the original pipelines resize CAMUS frames straight to a square."""
    if array.shape == (size, size):
        return np.asarray(array, np.uint8)
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(np.asarray(array, np.uint8)).resize((size, size), method))


def make_image(image: np.ndarray, mask: np.ndarray, *, name: str, patient: str, view: str, phase: str,
               sex: str, age: int, quality: str, split: str, source: str, size: int,
               cone: np.ndarray | None = None, drop_quality: bool = False,
               keep_orig_mask: bool = True, shapes: dict | None = None) -> dict:
    """One image + multi-class mask -> its stored entry: resized arrays, and the prompts of each structure
    present in the resized mask (a structure whose mask is empty gets no record claiming it is there).

    image, mask: [H0, W0] uint8 (mask labels 0-3); cone: [H0, W0] scan sector, derived from the image's
    non-zero support when None. name: unique image name inside the source (record key = source/name/structure).
    drop_quality: prompts as the original synthetic set (no image quality). shapes: {label: shape word} of
    the mask, when measured already for a batch (prompts.mask_shapes_batch; the mask at the corpus size).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    image, mask = np.asarray(image, np.uint8), np.asarray(mask, np.uint8)
    if image.shape != mask.shape:
        raise ValueError(f"{name}: image shape {image.shape} != mask shape {mask.shape}")
    if mask.max(initial=0) > 3:
        raise ValueError(f"{name}: mask labels must be in 0-3, found {int(mask.max())}")
    if image.size and image.min() == image.max():
        # A blank frame (a broken file, or a sampler gone wrong) is not an echo image; refuse real input,
        # warn for a synthetic one (the run still writes it so its shards stay aligned with its samples).
        message = f"{name}: the image is constant (every pixel {int(image.flat[0])})"
        if source != "synthetic":
            raise ValueError(message + "; not an echo frame")
        log.warning("%s; written anyway", message)
    cone = labels_lib.cone_from_image(image) if cone is None else np.asarray(cone, np.uint8)
    image_s, mask_s, cone_s = resize(image, size, False), resize(mask, size, True), resize(cone, size, True)
    present = [s for s in labels_lib.STRUCTURES if (mask_s == labels_lib.LABEL_OF[s]).any()]
    if shapes is None:
        shapes = prompts_lib.mask_shapes(mask, [labels_lib.LABEL_OF[s] for s in present])
    prompts = {s: prompts_lib.make_prompts(s, view, phase, sex, age, quality, shapes[labels_lib.LABEL_OF[s]],
                                           drop_quality=drop_quality) for s in present}
    return dict(key=f"{source}/{name}", image=image_s, mask=mask_s, cone=cone_s,
                orig_mask=mask if keep_orig_mask else np.zeros((0, 0), np.uint8), structures=present,
                prompts=prompts, patient=patient, view=view, phase=phase, sex=sex, age=int(age),
                quality=quality or "", split=split, source=source)


def structure_record(entry: dict, structure: str) -> dict:
    """The record of one structure of a stored image entry (the record contract)."""
    record = {k: v for k, v in entry.items() if k not in ("structures", "prompts")}
    record.update(key=f"{entry['key']}/{structure}", structure=structure, label=labels_lib.LABEL_OF[structure],
                  prompts=entry["prompts"][structure])
    return record


def image_records(entry: dict) -> list[dict]:
    """Stored image entry -> its records (LV, MYO, LA, those present), sharing the entry's arrays."""
    return [structure_record(entry, s) for s in entry["structures"]]


def make_records(image: np.ndarray, mask: np.ndarray, **kwargs) -> list[dict]:
    """One image + multi-class mask -> its records (see make_image for the arguments)."""
    return image_records(make_image(image, mask, **kwargs))


def _entries_from_records(records: Iterable[dict]) -> Iterator[dict]:
    """Records (as make_records gives them) -> image entries, grouping the consecutive records of one image."""
    group: list[dict] = []

    def entry_of(group):
        first = group[0]
        entry = {k: v for k, v in first.items() if k not in ("structure", "label", "prompts")}
        entry.update(key=first["key"].rsplit("/", 1)[0], structures=[r["structure"] for r in group],
                     prompts={r["structure"]: r["prompts"] for r in group})
        return entry

    for record in records:
        if group and record["key"].rsplit("/", 1)[0] != group[0]["key"].rsplit("/", 1)[0]:
            yield entry_of(group)
            group = []
        group.append(record)
    if group:
        yield entry_of(group)


# ----------------------------------------------------------------------------------------------- writing
def _sha256(path) -> str:
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: epath.Path, obj: Any) -> None:
    jsonio.write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def is_local(path) -> bool:
    """Whether `path` is on this host's filesystem (ArrayRecord opens it directly) rather than a URI."""
    return "://" not in os.fspath(path)


def _local_copy(path: epath.Path, folder: str) -> str:
    """A local file holding the shard at `path`: the path itself when local, else a copy in `folder`."""
    if is_local(path):
        return os.fspath(path)
    local = os.path.join(folder, path.name)
    if not os.path.exists(local):  # a file of this host's cache, not a corpus path
        part = f"{local}.part{threading.get_ident()}"
        path.copy(epath.Path(part), overwrite=True)
        os.replace(part, local)
    return local


def shard_name(split: str, writer_id: int, index: int) -> str:
    return f"{split}-w{writer_id:03d}-{index:05d}.array_record"


def _num_records(path: str) -> int:
    """Entries of a local ArrayRecord file."""
    from array_record.python import array_record_module
    reader = array_record_module.ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def claim_folder(out_dir, config: dict) -> None:
    """Make out_dir a corpus folder for `config`, or check it already is one for the same config."""
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.json"
    if config_path.exists():
        try:
            existing = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: unreadable corpus config ({e})") from None
        if existing != config:
            diff = sorted(k for k in set(existing) | set(config) if existing.get(k) != config.get(k))
            raise ValueError(f"{out_dir}: holds another corpus (config.json differs in {diff}); "
                             "use an empty or new --out folder")
        return
    foreign = [p.name for p in out_dir.iterdir()]
    if foreign:
        raise ValueError(f"{out_dir}: not empty and not a jaxboost corpus (found {foreign[:3]}); "
                         "use an empty or new --out folder")
    _write_json_atomic(config_path, config)


class CorpusWriter:
    """Streams image entries into complete, renamed shards; resumable; one instance per writer id.

    Usage:
        writer = CorpusWriter(out_dir, size=256, source="synthetic", writer_id=jax.process_index())
        for entry in entries:                    # or: if writer.wants(split): writer.add_image(make_image(...))
            writer.add_image(entry)
        writer.close()                           # parts/writer-XXX.json lists every finished shard
        finalize_corpus(out_dir)                 # once, after every writer closed: manifest.json

    Resume costs O(shards): the finished shards are the ones this writer's part manifest lists (each
    hashed once, when it was finished), so nothing is stat-ed or re-hashed per sample.
    """

    def __init__(self, out_dir, *, size: int, source: str, writer_id: int = 0,
                 records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, extra_config: dict | None = None):
        self.out_dir = epath.Path(out_dir)
        self.size, self.source, self.writer_id = check_size(size, "corpus size"), source, int(writer_id)
        self.images_per_shard = images_per_shard(records_per_shard)
        self.config = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "size": self.size,
                       "images_per_shard": self.images_per_shard, **(extra_config or {})}
        claim_folder(self.out_dir, self.config)
        for stale in self.out_dir.glob(f"*-w{self.writer_id:03d}-*.array_record.tmp"):
            stale.unlink()  # a shard a killed run left unfinished: redone from its first image
        (self.out_dir / "parts").mkdir(exist_ok=True)
        # Off a local disk, shards are written here and uploaded when finished (ArrayRecord writes local files).
        self._staging = None if is_local(self.out_dir) else tempfile.mkdtemp(prefix="jaxboost_shards_")
        self._part_path = self.out_dir / "parts" / f"writer-{self.writer_id:03d}.json"
        self._finished = self._read_part()  # (split, index) -> shard info
        self._position = {s: 0 for s in SPLITS}  # images seen per split
        self._open: dict[str, dict] = {}  # split -> the shard being written

    def _read_part(self) -> dict[tuple[str, int], dict]:
        """Finished shards from an earlier run's part manifest (a listed file that is gone is redone)."""
        if not self._part_path.is_file():
            return {}
        part = json_list.read_json(self._part_path, f"{self._part_path}: not found")
        if not isinstance(part, dict) or part.get("config") != self.config or not isinstance(part.get("shards"), list):
            raise ValueError(f"{self._part_path}: not a part manifest of this corpus config; use a new --out folder")
        finished = {}
        on_disk = {p.name for p in self.out_dir.glob(f"*-w{self.writer_id:03d}-*.array_record")}  # one listing
        for shard in part["shards"]:
            match = _SHARD_RE.match(str(shard.get("file")))
            if match and shard["file"] in on_disk:
                finished[(match.group(1), int(match.group(3)))] = shard
        return finished

    def _shard_path(self, split: str, index: int) -> epath.Path:
        return self.out_dir / shard_name(split, self.writer_id, index)

    def is_finished(self, split: str, position: int) -> bool:
        """Whether image `position` of this writer's `split` stream is in a shard finished by an earlier run."""
        return (split, position // self.images_per_shard) in self._finished

    def wants(self, split: str, count: int = 1) -> bool:
        """Whether any of the next `count` images of `split` lands in a shard not yet finished."""
        start = self._position[split]
        return not all(self.is_finished(split, p) for p in range(start, start + count))

    def skip(self, split: str, count: int = 1) -> None:
        """Advance past `count` images whose shards are already finished (see `wants`)."""
        self._position[split] += count

    def add_image(self, entry: dict, encoded: bytes | None = None) -> None:
        """Append one image entry (make_image) to its split's stream; ignored when its shard is finished.
        encoded: encode_record(entry), when a background thread made it already."""
        split = entry["split"]
        if split not in SPLITS:
            raise ValueError(f"image {entry.get('key')!r}: split must be one of {SPLITS}, got {split!r}")
        if entry["image"].shape != (self.size, self.size):
            raise ValueError(f"image {entry['key']!r}: image shape {entry['image'].shape} != corpus size "
                             f"({self.size}, {self.size})")
        position = self._position[split]
        self._position[split] += 1
        index = position // self.images_per_shard
        if (split, index) in self._finished:
            return
        if split in self._open and self._open[split]["index"] != index:
            self._finish(split)
        if split not in self._open:
            from array_record.python import array_record_module
            name = shard_name(split, self.writer_id, index) + ".tmp"
            tmp = os.path.join(self._staging, name) if self._staging else os.fspath(self.out_dir / name)
            self._open[split] = {"index": index, "tmp": tmp, "images": 0, "absent": [],
                                 "writer": array_record_module.ArrayRecordWriter(tmp, _ARRAY_RECORD_OPTIONS)}
        shard = self._open[split]
        shard["writer"].write(encode_record(entry) if encoded is None else encoded)
        shard["absent"] += [[shard["images"], s] for s in labels_lib.STRUCTURES if s not in entry["structures"]]
        shard["images"] += 1
        if (position + 1) % self.images_per_shard == 0:
            self._finish(split)

    def _finish(self, split: str) -> None:
        """Close, hash (once) and rename (or upload) the open shard, then record it in the part manifest."""
        shard = self._open.pop(split)
        shard["writer"].close()
        final = self._shard_path(split, shard["index"])
        tmp = epath.Path(shard["tmp"])
        info = {"file": final.name, "split": split, "writer": self.writer_id, "images": shard["images"],
                "records": shard["images"] * RECORDS_PER_IMAGE - len(shard["absent"]), "absent": shard["absent"],
                "bytes": tmp.stat().length, "sha256": _sha256(tmp)}
        if self._staging:
            tmp.copy(final, overwrite=True)  # one upload: the object appears whole
            tmp.unlink()
        else:
            tmp.replace(final)
        self._finished[(split, shard["index"])] = info
        self._write_part()

    def _write_part(self) -> dict:
        shards = [self._finished[k] for k in sorted(self._finished, key=lambda k: (SPLITS.index(k[0]), k[1]))]
        part = {"config": self.config, "writer": self.writer_id, "shards": shards}
        _write_json_atomic(self._part_path, part)
        return part

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave finished shards for a resume, drop the unfinished ones
            for shard in self._open.values():
                shard["writer"].close()
                epath.Path(shard["tmp"]).unlink(missing_ok=True)
            self._open.clear()
            self._drop_staging()

    def close(self) -> dict:
        """Finish open shards and write this writer's part manifest; returns it."""
        for split in list(self._open):
            self._finish(split)
        for split in SPLITS:
            indices = sorted(i for s, i in self._finished if s == split)
            on_disk = sum(self._finished[(split, i)]["images"] for i in indices)
            if on_disk != self._position[split] or indices != list(range(len(indices))):
                # shards kept from an earlier run of a different input
                raise ValueError(f"{self.out_dir}: writer {self.writer_id} was given {self._position[split]} "
                                 f"{split} images but its shards hold {on_disk}; the input changed since the "
                                 "interrupted build: use a new --out folder")
        part = self._write_part()
        self._drop_staging()
        return part

    def _drop_staging(self) -> None:
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)  # this host's temporary folder, not the corpus


def _read_parts(out_dir: epath.Path, expect_writers: int | None) -> list[dict]:
    part_paths = sorted((out_dir / "parts").glob("writer-*.json"))
    if not part_paths:
        raise FileNotFoundError(f"{out_dir / 'parts'}: no writer part manifests; did the writers close()?")
    if expect_writers is not None and len(part_paths) != expect_writers:
        raise ValueError(f"{out_dir / 'parts'}: expected {expect_writers} writer parts, found {len(part_paths)}")
    config = json_list.read_json(out_dir / "config.json", f"{out_dir / 'config.json'}: not found")
    parts = []
    for path in part_paths:
        part = json_list.read_json(path, f"{path}: not found")
        if not isinstance(part, dict) or part.get("config") != config:
            raise ValueError(f"{path}: written with another corpus config than {out_dir / 'config.json'}")
        parts.append(part)
    return parts


def finalize_corpus(out_dir, *, expect_writers: int | None = None, source_info: dict | None = None) -> dict:
    """Merge every writer's part manifest into manifest.json (written atomically, last)."""
    out_dir = epath.Path(out_dir)
    parts = _read_parts(out_dir, expect_writers)
    config = parts[0]["config"]
    shards = sorted((s for part in parts for s in part["shards"]),
                    key=lambda s: (SPLITS.index(s["split"]), s["writer"], s["file"]))
    counts = {split: sum(s["records"] for s in shards if s["split"] == split) for split in SPLITS}
    images = {split: sum(s["images"] for s in shards if s["split"] == split) for split in SPLITS}
    manifest = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "size": config["size"],
                "config": config, "counts": counts, "images": images, "num_records": sum(counts.values()),
                "num_images": sum(images.values()), "bytes": sum(s["bytes"] for s in shards),
                "shards": shards, "source": source_info or {}}
    _write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def build_corpus(images: Iterable, out_dir, *, size: int = 256, source: str, writer_id: int = 0,
                 num_writers: int = 1, records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
                 source_info: dict | None = None, extra_config: dict | None = None,
                 finalize: bool = True, on_image=None) -> dict | None:
    """Write a corpus from items; resumable; returns the manifest (when finalize).

    images: iterable of items, each an image entry (make_image), (split, load_fn) where load_fn() -> the
    image's entry (its load is skipped when the image's shard is already finished), or records as
    make_records gives them (the consecutive records of one image are stored as one entry). With
    num_writers > 1 this writer takes images i with i % num_writers == writer_id; call finalize_corpus
    once after all writers.
    """
    images = iter(images)
    first = next(images, None)
    items = itertools.chain([] if first is None else [first], images)
    if isinstance(first, dict) and "structures" not in first:  # records: group them by image
        items = _entries_from_records(items)
    with CorpusWriter(out_dir, size=size, source=source, writer_id=writer_id,
                      records_per_shard=records_per_shard, extra_config=extra_config) as writer:
        for item_index, item in enumerate(items):
            if item_index % num_writers != writer_id:
                continue
            if isinstance(item, dict):
                writer.add_image(item)  # passes over images whose shard is already finished
                continue
            split, load_fn = item
            if not writer.wants(split):
                writer.skip(split)
                continue
            writer.add_image(load_fn())
            if on_image is not None:
                on_image()
    if finalize and num_writers == 1:
        return finalize_corpus(out_dir, source_info=source_info)
    return None


def camus_items(root, *, size: int, source: str = "camus") -> tuple[list, dict]:
    """(split, load_fn) items for build_corpus from a CAMUS/phantom folder, and the source description."""
    from jaxboost.data import camus
    image_records = camus.read_camus(root)

    def loader(rec):
        def load():
            image, mask = rec.load()
            return make_image(image, mask, name=rec.name, patient=rec.patient, view=rec.view,
                                phase=rec.phase, sex=rec.sex, age=rec.age, quality=rec.quality,
                                split=rec.split, source=source, size=size)
        return load

    patients = {s: len({r.patient for r in image_records if r.split == s}) for s in SPLITS}
    info = {"kind": source, "path": str(Path(root).resolve()), "patients": patients}  # a local CAMUS folder
    return [(r.split, loader(r)) for r in image_records], info


# ----------------------------------------------------------------------------------------------- reading
class CorpusSource:
    """grain RandomAccessDataSource over one split: len() records, [i] -> decoded record dict.

    Reads the ArrayRecord shards directly (no grain import needed to inspect a corpus). A record index
    resolves to (shard, entry row, structure) from the manifest's shard list alone; readers open lazily, at
    most MAX_OPEN_READERS at a time (least recently used closed first), so the object pickles for grain
    worker processes and a host holds a bounded number of files open whatever the corpus size.
    """

    def __init__(self, root: str, shards: list[dict], schema_version: int = SCHEMA_VERSION):
        self._root, self._shards, self._schema = str(root), [dict(s) for s in shards], int(schema_version)
        self._starts = np.cumsum([0] + [int(s["records"]) for s in self._shards])
        self._readers: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._cache: str | None = None  # local copies of the shards of a corpus that is not on a local disk

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _path(self, shard: int) -> str:
        return os.fspath(epath.Path(self._root) / self._shards[shard]["file"])

    def _local_path(self, shard: int) -> str:
        if is_local(self._root):
            return self._path(shard)
        with self._lock:
            if self._cache is None:
                self._cache = tempfile.mkdtemp(prefix="jaxboost_corpus_cache_")
                weakref.finalize(self, shutil.rmtree, self._cache, True)  # this host's copies go with the source
        return _local_copy(epath.Path(self._path(shard)), self._cache)

    def _reader(self, shard: int):
        with self._lock:  # grain reads from several threads
            if shard in self._readers:
                self._readers.move_to_end(shard)
                return self._readers[shard]
            while len(self._readers) >= MAX_OPEN_READERS:
                self._readers.popitem(last=False)  # closed when the last thread reading it lets go, not now
        from array_record.python import array_record_module
        try:  # random access: no readahead
            reader = array_record_module.ArrayRecordReader(self._local_path(shard), "readahead_buffer_size:0")
        except Exception as e:  # noqa: BLE001 — riegeli raises plain RuntimeError/ValueError without the file
            raise ValueError(f"{self._path(shard)}: unreadable ArrayRecord shard ({_first_line(e)}); "
                             "run `jaxboost corpus verify` on the corpus") from None
        with self._lock:
            self._readers[shard] = reader
        return reader

    def _table(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(entry row, structure index) of each record of a schema-2 shard, from its manifest entry."""
        if shard not in self._tables:
            info = self._shards[shard]
            absent = {(int(row), structure) for row, structure in info.get("absent", [])}
            pairs = [(row, k) for row in range(int(info["images"]))
                     for k, structure in enumerate(labels_lib.STRUCTURES) if (row, structure) not in absent]
            self._tables[shard] = (np.asarray([p[0] for p in pairs], np.int64),
                                   np.asarray([p[1] for p in pairs], np.int64))
        return self._tables[shard]

    def _read(self, shard: int, rows: list[int], arrays: bool) -> list[dict]:
        """Decoded entries of one shard; a read or decode failure names the shard file."""
        try:
            return [decode_record(data, arrays) for data in self._reader(shard).read(rows)]
        except ValueError as e:
            if self._path(shard) in str(e):
                raise
            raise ValueError(f"{self._path(shard)}: unreadable entry among rows {rows[0]}-{rows[-1]} "
                             f"({_first_line(e)}); run `jaxboost corpus verify` on the corpus") from None
        except Exception as e:  # noqa: BLE001 — riegeli/zlib/msgpack errors do not say which file
            raise ValueError(f"{self._path(shard)}: unreadable entry among rows {rows[0]}-{rows[-1]} "
                             f"({type(e).__name__}: {_first_line(e)}); run `jaxboost corpus verify` on the corpus") from None

    def _records_of(self, shard: int, indices: list[int], arrays: bool) -> list[dict]:
        """Records at shard-local indices."""
        if self._schema == 1:
            return self._read(shard, indices, arrays)
        rows, kinds = self._table(shard)
        wanted = sorted(set(int(rows[i]) for i in indices))
        entries = dict(zip(wanted, self._read(shard, wanted, arrays)))
        return [structure_record(entries[int(rows[i])], labels_lib.STRUCTURES[int(kinds[i])]) for i in indices]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self._records_of(shard, [index - int(self._starts[shard])], True)[0]

    def iter_sequential(self, block: int = 64, arrays: bool = True) -> Iterator[dict]:
        for shard, info in enumerate(self._shards):
            count = int(info["records"])
            for start in range(0, count, block):
                yield from self._records_of(shard, list(range(start, min(start + block, count))), arrays)

    def indices_of_structure(self, structure: str) -> list[int] | None:
        """Indices of the records of one structure, from the manifest (no read); None for schema 1."""
        if self._schema == 1:
            return None
        kind = labels_lib.STRUCTURES.index(structure)
        return [int(self._starts[shard]) + int(i) for shard in range(len(self._shards))
                for i in np.flatnonzero(self._table(shard)[1] == kind)]

    def __getstate__(self):
        return {"_root": self._root, "_shards": self._shards, "_schema": self._schema, "_starts": self._starts}

    def __setstate__(self, state):
        self.__dict__.update(state, _readers=collections.OrderedDict(), _tables={}, _lock=threading.Lock(),
                             _cache=None)

    def __repr__(self) -> str:
        return f"CorpusSource({len(self._shards)} shards, {len(self)} records)"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


@dataclasses.dataclass
class Corpus:
    path: epath.Path
    manifest: dict

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def schema_version(self) -> int:
        return int(self.manifest["schema_version"])

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.path / s["file"]) for s in self.manifest["shards"] if s["split"] == split]

    def split_len(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return int(self.manifest["counts"][split])

    def num_images(self, split: str | None = None) -> int:
        """Stored images (entries) of a split or of the corpus; schema 1 stored one per record."""
        shards = [s for s in self.manifest["shards"] if split is None or s["split"] == split]
        return sum(int(s.get("images", s["records"])) for s in shards)

    def num_bytes(self) -> int:
        """Bytes of every shard (listed in a schema-2 manifest; measured on disk for schema 1)."""
        return sum(int(s["bytes"]) if "bytes" in s else (self.path / s["file"]).stat().length
                   for s in self.manifest["shards"])

    def source(self, split: str) -> CorpusSource:
        self.split_len(split)  # validates the split name
        shards = [s for s in self.manifest["shards"] if s["split"] == split]
        return CorpusSource(str(self.path), shards, self.schema_version)

    def iter(self, split: str, arrays: bool = True) -> Iterator[dict]:
        """Records of a split in stored order, read sequentially (arrays=False: metadata only)."""
        yield from self.source(split).iter_sequential(arrays=arrays)

    def verify(self) -> list[str]:
        """Re-check every shard's sha256 and entry count against the manifest; one line per bad shard
        (empty when the corpus is intact)."""
        problems, present = [], _file_names(self.path)
        with tempfile.TemporaryDirectory(prefix="jaxboost_verify_") as cache:  # local copies of remote shards
            for shard in self.manifest["shards"]:
                path = self.path / shard["file"]
                entries = int(shard.get("images", shard["records"]))
                if shard["file"] not in present:
                    problems.append(f"{path}: shard listed in manifest.json is missing")
                elif _sha256(path) != shard["sha256"]:
                    problems.append(f"{path}: sha256 does not match manifest.json (corrupt or replaced shard)")
                else:
                    try:
                        found = _num_records(_local_copy(path, cache))
                    except Exception as e:  # noqa: BLE001 — riegeli's error does not name the file
                        problems.append(f"{path}: unreadable ArrayRecord shard ({_first_line(e)})")
                        continue
                    if found != entries:
                        problems.append(f"{path}: holds {found} entries, manifest.json says {entries}")
                    if not is_local(path):
                        os.remove(os.path.join(cache, path.name))  # one shard's copy on this host at a time
        return problems


def _file_names(folder: epath.Path) -> set[str]:
    """Names of the files in a corpus folder: one listing (one request on an object store), not a stat per
    shard."""
    return {p.name for p in folder.iterdir()}


def _check_manifest(manifest, manifest_path) -> None:
    """One clear line for a manifest that is not a corpus manifest of a readable schema."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path}: expected a JSON object (a corpus manifest), got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        raise ValueError(f"{manifest_path}: schema_version {manifest.get('schema_version')!r} is not supported "
                         f"(this jaxboost reads versions {READABLE_SCHEMAS}); rebuild the corpus")
    shards, counts = manifest.get("shards"), manifest.get("counts")
    needed = ("file", "split", "records", "sha256") + (("images",) if manifest["schema_version"] >= 2 else ())
    if not isinstance(shards, list) or not all(isinstance(s, dict) and all(k in s for k in needed) for s in shards):
        raise ValueError(f"{manifest_path}: 'shards' must be a list of objects with {list(needed)}")
    if not isinstance(counts, dict) or not isinstance(manifest.get("size"), int):
        raise ValueError(f"{manifest_path}: 'counts' (records per split) and 'size' are required")
    for split in SPLITS:
        listed = sum(int(s["records"]) for s in shards if s["split"] == split)
        if counts.get(split) != listed:
            raise ValueError(f"{manifest_path}: counts[{split!r}] is {counts.get(split)!r} but its shards hold "
                             f"{listed} records (edited or mixed-up manifest)")


def open_corpus(path, *, verify: bool = False) -> Corpus:
    """Open a finished corpus folder; checks the manifest's format, schema version, counts and shard files."""
    path = epath.Path(path)
    manifest_path = path / "manifest.json"
    manifest = json_list.read_json(
        manifest_path, f"{manifest_path}: no manifest (not a corpus, or its build did not finish)")
    _check_manifest(manifest, manifest_path)
    present = _file_names(path)
    for shard in manifest["shards"]:
        if shard["file"] not in present:
            raise FileNotFoundError(f"{path / shard['file']}: shard listed in manifest.json is missing")
    corpus = Corpus(path, manifest)
    if verify and (problems := corpus.verify()):
        raise ValueError("; ".join(problems))
    return corpus

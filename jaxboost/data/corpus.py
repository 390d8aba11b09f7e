"""The triplet corpus: sharded ArrayRecord files of (image, mask, prompts, metadata) records + a manifest.

Layout of a corpus folder:
    config.json                  what this folder is being built as (schema, size, shard size, source);
                                 a second build with another config is refused.
    {split}-w{writer:03d}-{index:05d}.array_record   complete shards only (written as *.tmp, then renamed)
    parts/writer-{writer:03d}.json                    the shards one writer finished (its part manifest)
    manifest.json                written last, atomically, by `finalize_corpus` from all parts

Shard i of (split, writer) holds that writer's records i*N .. i*N+N-1 of the split, in the order they were
given, so a killed build that is rerun with the same input skips complete shards, redoes only the
unfinished one, and ends with byte-identical shards and manifest. Several hosts write one corpus with
distinct writer ids; `finalize_corpus` merges their parts.

Record contract (decoded dict): key, image uint8 [S, S], mask uint8 [S, S] (CAMUS labels 0-3), cone uint8
[S, S], structure "LV"|"MYO"|"LA", label 1|2|3, prompts (8 x [ending "of the heart", ending "in the cardiac
ultrasound"]), patient, view, phase, sex, age, quality, split, source ("camus"|"phantom"|"synthetic"),
orig_mask uint8 [H0, W0] (source resolution; may be empty for synthetic).
Encoding: msgpack map; arrays as {dtype, shape, zlib bytes}.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack
import numpy as np
from PIL import Image

from jaxboost.data import json_list
from jaxboost.data import labels as labels_lib
from jaxboost.data import prompts as prompts_lib

SCHEMA_VERSION = 1
FORMAT_NAME = "jaxboost-triplet-corpus"
SPLITS = ("train", "val", "test")
SOURCES = ("camus", "phantom", "synthetic")
ARRAY_FIELDS = ("image", "mask", "cone", "orig_mask")
DEFAULT_RECORDS_PER_SHARD = 1024
_SHARD_RE = re.compile(r"^(train|val|test)-w(\d{3})-(\d{5})\.array_record$")
_ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for grain


# ----------------------------------------------------------------------------------------------- records
def encode_record(record: dict) -> bytes:
    """Record dict -> bytes (msgpack; numpy arrays zlib-compressed with dtype and shape)."""
    out = {}
    for name, value in record.items():
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)
            out[name] = {"__nd__": True, "dtype": value.dtype.str, "shape": list(value.shape),
                         "data": zlib.compress(value.tobytes(), 1)}  # level 1: 2x faster than 6, ~6% larger
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
            array = np.frombuffer(zlib.decompress(value["data"]), dtype=np.dtype(value["dtype"]))
            record[name] = array.reshape(value["shape"])
    return record


def resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """[H, W] uint8 -> [size, size] uint8 (PIL; bilinear for images, nearest for label maps). Stretches, as
    the original pipelines resize CAMUS frames straight to a square."""
    if array.shape == (size, size):
        return np.asarray(array, np.uint8)
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(np.asarray(array, np.uint8)).resize((size, size), method))


def make_records(image: np.ndarray, mask: np.ndarray, *, name: str, patient: str, view: str, phase: str,
                 sex: str, age: int, quality: str, split: str, source: str, size: int,
                 cone: np.ndarray | None = None, drop_quality: bool = False,
                 keep_orig_mask: bool = True) -> list[dict]:
    """One image + multi-class mask -> 3 records (LV, MYO, LA) following the record contract.

    image, mask: [H0, W0] uint8 (mask labels 0-3); cone: [H0, W0] scan sector, derived from the image's
    non-zero support when None. name: unique image name inside the source (key = source/name/structure).
    drop_quality: prompts as the original synthetic set (no image quality).
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
    cone = labels_lib.cone_from_image(image) if cone is None else np.asarray(cone, np.uint8)
    image_s, mask_s, cone_s = resize(image, size, False), resize(mask, size, True), resize(cone, size, True)
    records = []
    for structure in labels_lib.STRUCTURES:
        label = labels_lib.LABEL_OF[structure]
        shape = prompts_lib.mask_shape(mask == label)
        prompts = prompts_lib.make_prompts(structure, view, phase, sex, age, quality, shape,
                                           drop_quality=drop_quality)
        records.append(dict(
            key=f"{source}/{name}/{structure}", image=image_s, mask=mask_s, cone=cone_s,
            structure=structure, label=label, prompts=prompts, patient=patient, view=view, phase=phase,
            sex=sex, age=int(age), quality=quality or "", split=split, source=source,
            orig_mask=mask if keep_orig_mask else np.zeros((0, 0), np.uint8)))
    return records


# ----------------------------------------------------------------------------------------------- writing
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def shard_name(split: str, writer_id: int, index: int) -> str:
    return f"{split}-w{writer_id:03d}-{index:05d}.array_record"


def _num_records(path: Path) -> int:
    from array_record.python import array_record_module
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def claim_folder(out_dir: Path, config: dict) -> None:
    """Make out_dir a corpus folder for `config`, or check it already is one for the same config."""
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
    """Streams records into complete, renamed shards; resumable; one instance per writer id.

    Usage:
        writer = CorpusWriter(out_dir, size=256, source="synthetic", writer_id=jax.process_index())
        for rec in records:                      # or: if writer.wants(split): writer.add(make_record())
            writer.add(rec)
        writer.close()                           # writes parts/writer-XXX.json
        finalize_corpus(out_dir)                 # once, after every writer closed: manifest.json
    """

    def __init__(self, out_dir, *, size: int, source: str, writer_id: int = 0,
                 records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, extra_config: dict | None = None):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.out_dir = Path(out_dir)
        self.size, self.source, self.writer_id = int(size), source, int(writer_id)
        self.records_per_shard = int(records_per_shard)
        self.config = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "size": self.size,
                       "records_per_shard": self.records_per_shard, **(extra_config or {})}
        claim_folder(self.out_dir, self.config)
        for stale in self.out_dir.glob(f"*-w{self.writer_id:03d}-*.array_record.tmp"):
            stale.unlink()  # a shard a killed run left unfinished: redone from its first record
        (self.out_dir / "parts").mkdir(exist_ok=True)
        self._position = {s: 0 for s in SPLITS}  # records seen per split
        self._open: dict[str, tuple[int, Any, Path]] = {}  # split -> (shard index, writer, tmp path)

    def _shard_path(self, split: str, index: int) -> Path:
        return self.out_dir / shard_name(split, self.writer_id, index)

    def wants(self, split: str, count: int = 1) -> bool:
        """Whether any of the next `count` records of `split` lands in a shard not yet complete on disk."""
        start = self._position[split]
        first, last = start // self.records_per_shard, (start + count - 1) // self.records_per_shard
        return any(not self._shard_path(split, i).exists() for i in range(first, last + 1))

    def skip(self, split: str, count: int = 1) -> None:
        """Advance past `count` records whose shards are already complete (see `wants`)."""
        self._position[split] += count

    def add(self, record: dict) -> None:
        split = record["split"]
        if split not in SPLITS:
            raise ValueError(f"record {record.get('key')!r}: split must be one of {SPLITS}, got {split!r}")
        if record["image"].shape != (self.size, self.size):
            raise ValueError(f"record {record['key']!r}: image shape {record['image'].shape} != corpus size "
                             f"({self.size}, {self.size})")
        position = self._position[split]
        self._position[split] += 1
        index = position // self.records_per_shard
        final = self._shard_path(split, index)
        if final.exists():
            return  # complete from an earlier run
        if split in self._open and self._open[split][0] != index:
            self._finish(split)
        if split not in self._open:
            from array_record.python import array_record_module
            tmp = final.with_name(final.name + ".tmp")
            self._open[split] = (index, array_record_module.ArrayRecordWriter(str(tmp), _ARRAY_RECORD_OPTIONS), tmp)
        self._open[split][1].write(encode_record(record))
        if (position + 1) % self.records_per_shard == 0:
            self._finish(split)

    def _finish(self, split: str) -> None:
        index, writer, tmp = self._open.pop(split)
        writer.close()
        os.replace(tmp, self._shard_path(split, index))

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave complete shards for a resume, drop the unfinished ones
            for _, writer, tmp in self._open.values():
                writer.close()
                tmp.unlink(missing_ok=True)
            self._open.clear()

    def close(self) -> dict:
        """Finish open shards and write this writer's part manifest; returns it."""
        for split in list(self._open):
            self._finish(split)
        shards = []
        for split in SPLITS:
            index = 0
            while (path := self._shard_path(split, index)).exists():
                shards.append({"file": path.name, "split": split, "writer": self.writer_id,
                               "records": _num_records(path), "sha256": _sha256(path)})
                index += 1
            on_disk = sum(s["records"] for s in shards if s["split"] == split)
            if on_disk != self._position[split]:  # shards kept from an earlier run of a different input
                raise ValueError(f"{self.out_dir}: writer {self.writer_id} was given {self._position[split]} "
                                 f"{split} records but its shards hold {on_disk}; the input changed since the "
                                 "interrupted build: use a new --out folder")
        part = {"config": self.config, "writer": self.writer_id, "shards": shards}
        _write_json_atomic(self.out_dir / "parts" / f"writer-{self.writer_id:03d}.json", part)
        return part


def finalize_corpus(out_dir, *, expect_writers: int | None = None, source_info: dict | None = None) -> dict:
    """Merge every writer's part manifest into manifest.json (written atomically, last)."""
    out_dir = Path(out_dir)
    part_paths = sorted((out_dir / "parts").glob("writer-*.json"))
    if not part_paths:
        raise FileNotFoundError(f"{out_dir / 'parts'}: no writer part manifests; did the writers close()?")
    if expect_writers is not None and len(part_paths) != expect_writers:
        raise ValueError(f"{out_dir / 'parts'}: expected {expect_writers} writer parts, found {len(part_paths)}")
    parts = [json.loads(p.read_text()) for p in part_paths]
    config = json.loads((out_dir / "config.json").read_text())
    for path, part in zip(part_paths, parts):
        if part["config"] != config:
            raise ValueError(f"{path}: written with another corpus config than {out_dir / 'config.json'}")
    shards = sorted((s for part in parts for s in part["shards"]),
                    key=lambda s: (SPLITS.index(s["split"]), s["writer"], s["file"]))
    counts = {split: sum(s["records"] for s in shards if s["split"] == split) for split in SPLITS}
    manifest = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "size": config["size"],
                "config": config, "counts": counts, "num_records": sum(counts.values()),
                "shards": shards, "source": source_info or {}}
    _write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def build_corpus(images: Iterable, out_dir, *, size: int = 256, source: str, writer_id: int = 0,
                 num_writers: int = 1, records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
                 source_info: dict | None = None, extra_config: dict | None = None,
                 finalize: bool = True, on_image=None) -> dict | None:
    """Write a corpus from items; resumable; returns the manifest (when finalize).

    images: iterable of items, each either a record dict (see make_records) or (split, load_fn) where
    load_fn() -> the image's records (3); a lazy item's load is skipped when its records' shards are
    already complete. With num_writers > 1 this writer takes items i with i % num_writers == writer_id;
    call finalize_corpus once after all writers.
    """
    with CorpusWriter(out_dir, size=size, source=source, writer_id=writer_id,
                      records_per_shard=records_per_shard, extra_config=extra_config) as writer:
        for item_index, item in enumerate(images):
            if item_index % num_writers != writer_id:
                continue
            if isinstance(item, dict):
                writer.add(item)  # add() itself passes over records whose shard is already complete
                continue
            split, load_fn = item
            n = len(labels_lib.STRUCTURES)
            if not writer.wants(split, n):
                writer.skip(split, n)
                continue
            for record in load_fn():
                writer.add(record)
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
            return make_records(image, mask, name=rec.name, patient=rec.patient, view=rec.view,
                                phase=rec.phase, sex=rec.sex, age=rec.age, quality=rec.quality,
                                split=rec.split, source=source, size=size)
        return load

    patients = {s: len({r.patient for r in image_records if r.split == s}) for s in SPLITS}
    info = {"kind": source, "path": str(Path(root).resolve()), "patients": patients}
    return [(r.split, loader(r)) for r in image_records], info


# ----------------------------------------------------------------------------------------------- reading
class CorpusSource:
    """grain RandomAccessDataSource over one split: len() records, [i] -> decoded record dict.

    Reads the ArrayRecord shards directly (no grain import needed to inspect a corpus); readers open
    lazily so the object pickles for grain worker processes.
    """

    def __init__(self, paths: list[str], counts: list[int]):
        self._paths, self._counts = list(paths), [int(c) for c in counts]
        self._starts = np.cumsum([0] + self._counts)
        self._readers: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _reader(self, shard: int):
        if shard not in self._readers:
            from array_record.python import array_record_module
            self._readers[shard] = array_record_module.ArrayRecordReader(
                self._paths[shard], "readahead_buffer_size:0")  # random access: no readahead
        return self._readers[shard]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return decode_record(self._reader(shard).read([index - int(self._starts[shard])])[0])

    def iter_sequential(self, block: int = 64, arrays: bool = True) -> Iterator[dict]:
        for shard, count in enumerate(self._counts):
            reader = self._reader(shard)
            for start in range(0, count, block):
                for data in reader.read(list(range(start, min(start + block, count)))):
                    yield decode_record(data, arrays)

    def __getstate__(self):
        return {"_paths": self._paths, "_counts": self._counts, "_starts": self._starts, "_readers": {}}

    def __repr__(self) -> str:
        return f"CorpusSource({len(self._paths)} shards, {len(self)} records)"


@dataclasses.dataclass
class Corpus:
    path: Path
    manifest: dict

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.path / s["file"]) for s in self.manifest["shards"] if s["split"] == split]

    def split_len(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return int(self.manifest["counts"][split])

    def source(self, split: str) -> CorpusSource:
        self.split_len(split)  # validates the split name
        shards = [s for s in self.manifest["shards"] if s["split"] == split]
        return CorpusSource([str(self.path / s["file"]) for s in shards], [s["records"] for s in shards])

    def iter(self, split: str, arrays: bool = True) -> Iterator[dict]:
        """Records of a split in stored order, read sequentially (arrays=False: metadata only)."""
        yield from self.source(split).iter_sequential(arrays=arrays)

    def verify(self) -> None:
        """Recompute every shard's sha256 and record count against the manifest."""
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            if _sha256(path) != shard["sha256"]:
                raise ValueError(f"{path}: sha256 does not match manifest.json (corrupt or replaced shard)")
            if _num_records(path) != shard["records"]:
                raise ValueError(f"{path}: record count does not match manifest.json")


def open_corpus(path, *, verify: bool = False) -> Corpus:
    """Open a finished corpus folder; checks the manifest's format, schema version and shard files."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    manifest = json_list.read_json(
        manifest_path, f"{manifest_path}: no manifest (not a corpus, or its build did not finish)")
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{manifest_path}: schema_version {manifest.get('schema_version')!r} is not supported "
                         f"(this jaxboost reads version {SCHEMA_VERSION}); rebuild the corpus")
    for shard in manifest["shards"]:
        if not (path / shard["file"]).is_file():
            raise FileNotFoundError(f"{path / shard['file']}: shard listed in manifest.json is missing")
    corpus = Corpus(path, manifest)
    if verify:
        corpus.verify()
    return corpus
